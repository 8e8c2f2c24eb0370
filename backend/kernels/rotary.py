"""Rotary position embedding (rotate-half / NeoX layout, as in HF Llama), fused with the write of K and V
into the paged KV cache."""
from __future__ import annotations

import torch


def apply_rotary_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; positions: [T]; cos_sin_cache: [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2]), float32."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin_cache[positions].unsqueeze(1).float().split(half, dim=-1)
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> kv_cache [2, num_blocks, block_size, Hkv, D] at the flat slots given."""
    flat = kv_cache.view(2, -1, *kv_cache.shape[-2:])
    flat[0, slot_mapping] = k.to(kv_cache.dtype)
    flat[1, slot_mapping] = v.to(kv_cache.dtype)


def rotary_and_cache_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place of a copy, writes rotated k and v into the cache; returns (q, k)."""
    q = apply_rotary_ref(q, positions, cos_sin_cache)
    k = apply_rotary_ref(k, positions, cos_sin_cache)
    write_kv_cache_ref(k, v, kv_cache, slot_mapping)
    return q, k


# ---- Triton kernel ------------------------------------------------------------------------------------------
try:
    import triton.language as tl

    from backend.kernels._pdl import gdc_launch_dependents, gdc_wait
except ImportError:  # triton is optional on CPU: the references above need only torch
    tl = None

from backend.kernels._jit import lazy_jit
from backend.kernels._pdl import pdl_args


@lazy_jit
def _rotary_and_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, cache_ptr, slot_ptr, qo_ptr, ko_ptr,
                             q_st, q_sh, k_st, k_sh, v_st, v_sh, cs_st,
                             c_kv, c_blk, c_row, c_head, qo_st, qo_sh, ko_st, ko_sh,
                             HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                             BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr):
    # One token per program, all its heads at once: cos/sin are loaded once per token, q/k/v are read
    # through their own strides (views of the fused qkv projection need no copy), and rotated k and v go
    # straight to the paged cache, so k never makes a round trip through memory before the cache write.
    if PDL:  # see _pdl.py: the next kernel may launch now; nothing here is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dm = d < HALF
    cos = tl.load(cs_ptr + pos * cs_st + d, mask=dm, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * cs_st + HALF + d, mask=dm, other=0.0)[None, :]

    hq = tl.arange(0, BLOCK_HQ)[:, None]
    mq = (hq < HQ) & dm[None, :]
    q1 = tl.load(q_ptr + t * q_st + hq * q_sh + d[None, :], mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + t * q_st + hq * q_sh + HALF + d[None, :], mask=mq, other=0.0).to(tl.float32)
    qo = qo_ptr + t * qo_st + hq * qo_sh + d[None, :]
    tl.store(qo, (q1 * cos - q2 * sin).to(qo_ptr.dtype.element_ty), mask=mq)
    tl.store(qo + HALF, (q2 * cos + q1 * sin).to(qo_ptr.dtype.element_ty), mask=mq)

    hk = tl.arange(0, BLOCK_HKV)[:, None]
    mk = (hk < HKV) & dm[None, :]
    k1 = tl.load(k_ptr + t * k_st + hk * k_sh + d[None, :], mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + t * k_st + hk * k_sh + HALF + d[None, :], mask=mk, other=0.0).to(tl.float32)
    r1 = (k1 * cos - k2 * sin).to(ko_ptr.dtype.element_ty)  # rounded to k's dtype, as the reference
    r2 = (k2 * cos + k1 * sin).to(ko_ptr.dtype.element_ty)
    ko = ko_ptr + t * ko_st + hk * ko_sh + d[None, :]
    tl.store(ko, r1, mask=mk)
    tl.store(ko + HALF, r2, mask=mk)

    # Negative slots (padding tokens, e.g. in a CUDA graph's padded batch) write nothing.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    mc = mk & (slot >= 0)
    dst = cache_ptr + (slot // BLOCK_SIZE) * c_blk + (slot % BLOCK_SIZE) * c_row + hk * c_head + d[None, :]
    tl.store(dst, r1.to(cache_ptr.dtype.element_ty), mask=mc)
    tl.store(dst + HALF, r2.to(cache_ptr.dtype.element_ty), mask=mc)
    v1 = tl.load(v_ptr + t * v_st + hk * v_sh + d[None, :], mask=mc, other=0.0)
    v2 = tl.load(v_ptr + t * v_st + hk * v_sh + HALF + d[None, :], mask=mc, other=0.0)
    tl.store(dst + c_kv, v1.to(cache_ptr.dtype.element_ty), mask=mc)
    tl.store(dst + c_kv + HALF, v2.to(cache_ptr.dtype.element_ty), mask=mc)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_and_cache_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            *, out_q: torch.Tensor | None = None,
                            out_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as rotary_and_cache_ref. q [T, Hq, D], k and v [T, Hkv, D] may be strided views (e.g.
    split from the fused qkv output); only the last dimension must have unit stride (else it is copied).
    Returns new contiguous (q_rot, k_rot). A negative slot_mapping entry skips that token's cache write.

    Specializations: Hq, Hkv, D, the kv block size, the dtypes, and the strides' divisibility by 16.
    """
    import triton

    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    num_tokens, hq, head_dim = q.shape
    hkv = k.shape[1]
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out_q is None else out_q
    out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device) if out_k is None else out_k
    if num_tokens == 0:
        return out_q, out_k
    half = head_dim // 2
    _rotary_and_cache_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping, out_q, out_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        out_q.stride(0), out_q.stride(1), out_k.stride(0), out_k.stride(1),
        HQ=hq, HKV=hkv, HALF=half, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HKV=triton.next_power_of_2(hkv),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_SIZE=kv_cache.shape[2], num_warps=4, **pdl_args(q.device))
    return out_q, out_k
