"""KV cache in 8 bits: the rotary + cache write and the paged attention of rotary.py / paged_attention.py, for a
cache that stores keys and values quantized.

Layouts (per layer; both are 5-d tensors [2, num_blocks, block_size, Hkv, D] of the codes, like the float
cache, so the block manager, CUDA graphs and every shape[2] / shape[3] reader are unchanged):
  fp8:  float8_e4m3fn, contiguous; values stored as they are (e4m3 reaches 448, far beyond post-RoPE keys and
        values), no scale: exactly half the bytes of a 16-bit cache.
  int8: each (token, head) vector as D int8 codes with its scale (absmax / 127, float16) kept apart. One flat
        int8 buffer of 2 * num_blocks * block_size * Hkv * (D + 2) bytes; each (kv, block) holds
            codes  [block_size, Hkv, D] int8      (block_size * Hkv * D bytes), then
            scales [Hkv, block_size] float16      (block_size * Hkv * 2 bytes).
        The cache tensor is the codes, a strided view of that buffer (allocate_kv_cache):
        strides (num_blocks * B, B, Hkv * D, D, 1) with B = block_size * Hkv * (D + 2), so cache[kv, blk, t, h]
        is that vector's codes; int8_scales(cache) views the scales. Copies of the tensor (.contiguous(),
        clone, torch.zeros(shape)) lose the scales: the wrappers check the strides.
        Why: the previous layout, [.., Hkv, D + 2] with the scale in each row's last two bytes, left K/V rows
        of 130 bytes, only 2-byte aligned, so the attention kernels could not use 16-byte vector loads: on an
        H100, decode at batch 64 x 2k context took 731 us against 186 us for the bf16 cache and 143 us for
        fp8. Here every code row starts 16-byte aligned (D % 16 == 0 and block_size * Hkv % 8 == 0, true for
        block_size 16), at the same D + 2 bytes per (token, head): 2 * D / (D + 2) the tokens of a 16-bit cache
        (D = 128: 1.97x). Scales are [Hkv, block_size] so one head's scales over a block are contiguous.
Attention dequantizes after the dot products: scores = (q . k_codes) * k_scale and p * v_scale before p . v,
so the codes enter the tensor cores exactly.
"""
from __future__ import annotations

import torch

from backend.engine.attention_metadata import AttentionMetadata
from backend.kernels.paged_attention import gather_sequence_kv
from backend.kernels.rotary import apply_rotary_ref

KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0
SCALE_BYTES = 2


def bytes_per_head(kind: str, head_dim: int) -> int:
    """Cache bytes per (token, head) vector: D codes, plus the float16 scale for int8."""
    return head_dim + SCALE_BYTES if kind == "int8" else head_dim


def int8_strides(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Strides (in bytes) of the int8 cache's codes view: a gap of block_size * Hkv * 2 scale bytes per block."""
    block = block_size * num_kv_heads * (head_dim + SCALE_BYTES)
    return (num_blocks * block, block, num_kv_heads * head_dim, head_dim, 1)


def allocate_kv_cache(kind: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """A zeroed `kind` cache [2, num_blocks, block_size, Hkv, D] in the layout of the module docstring."""
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if kind != "int8":
        return torch.zeros(shape, dtype=KV_DTYPES[kind], device=device)
    strides = int8_strides(num_blocks, block_size, num_kv_heads, head_dim)
    raw = torch.zeros(2 * strides[0], dtype=torch.int8, device=device)
    return raw.as_strided(shape, strides)


def check_int8_layout(kv_cache: torch.Tensor) -> None:
    """Raises unless kv_cache is an int8 cache from allocate_kv_cache (or a slice of blocks of one)."""
    two, num_blocks, block_size, hkv, head_dim = kv_cache.shape
    want = int8_strides(num_blocks, block_size, hkv, head_dim)
    if kv_cache.stride()[1:] != want[1:] or (two == 2 and kv_cache.stride(0) % want[1]):
        raise ValueError(f"int8 KV cache with strides {kv_cache.stride()}, not {want}: build it with "
                         "kv_quant.allocate_kv_cache (a plain [2, blocks, block_size, Hkv, D] tensor has no room "
                         "for the scales)")


def int8_scales(kv_cache: torch.Tensor) -> torch.Tensor:
    """The float16 scales of an int8 cache, a view: [2, num_blocks, Hkv, block_size]."""
    check_int8_layout(kv_cache)
    two, num_blocks, block_size, hkv, head_dim = kv_cache.shape
    raw = kv_cache.as_strided((two, num_blocks, hkv * block_size * SCALE_BYTES), kv_cache.stride()[:2] + (1,),
                              kv_cache.storage_offset() + block_size * hkv * head_dim)
    return raw.view(torch.float16).unflatten(-1, (hkv, block_size))


def quantize_kv_ref(x: torch.Tensor, cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[..., D] float -> (codes [..., D] of cache_dtype, float16 scales [...]; None for fp8)."""
    if cache_dtype == torch.float8_e4m3fn:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), None
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / 127.0).clamp(min=1e-6).half()
    codes = torch.round(xf / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_kv_ref(codes: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(codes [..., D], scales [...] or None) -> float32 [..., D]."""
    return codes.float() if scale is None else codes.float() * scale.float()[..., None]


def dequantize_cache_ref(kv_cache: torch.Tensor) -> torch.Tensor:
    """A whole quantized cache -> float32 [2, num_blocks, block_size, Hkv, D]."""
    if kv_cache.dtype != torch.int8:
        return kv_cache.float()
    return dequantize_kv_ref(kv_cache, int8_scales(kv_cache).transpose(-1, -2))


def quantize_cache_ref(float_cache: torch.Tensor, kind: str) -> torch.Tensor:
    """A float cache [2, num_blocks, block_size, Hkv, D] -> a new `kind` cache holding it (tests, benchmarks)."""
    cache = allocate_kv_cache(kind, *float_cache.shape[1:], device=float_cache.device)
    codes, scale = quantize_kv_ref(float_cache, cache.dtype)
    cache.copy_(codes)
    if scale is not None:
        int8_scales(cache).copy_(scale.transpose(-1, -2))
    return cache


def write_kv_cache_quant_ref(k, v, kv_cache, slot_mapping) -> None:
    """k, v: [T, Hkv, D] -> the quantized cache at the flat slots given."""
    block_size = kv_cache.shape[2]
    blk, row = slot_mapping // block_size, slot_mapping % block_size
    scales = int8_scales(kv_cache) if kv_cache.dtype == torch.int8 else None
    for kv, x in enumerate((k, v)):
        codes, scale = quantize_kv_ref(x, kv_cache.dtype)
        kv_cache[kv, blk, row] = codes
        if scales is not None:
            scales[kv, blk, :, row] = scale


def rotary_and_cache_quant_ref(q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping):
    """Same contract as rotary_and_cache_ref, for a quantized cache."""
    q = apply_rotary_ref(q, positions, cos_sin_cache)
    k = apply_rotary_ref(k, positions, cos_sin_cache)
    write_kv_cache_quant_ref(k, v, kv_cache, slot_mapping)
    return q, k


def _sequence_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's dequantized keys and values, float32 [seq_len, Hkv, D] each."""
    keys, values = gather_sequence_kv(kv_cache, block_ids, seq_len)
    if kv_cache.dtype != torch.int8:
        return keys.float(), values.float()
    scales = int8_scales(kv_cache)[:, block_ids].transpose(-1, -2).flatten(1, 2)[:, :seq_len]  # [2, seq, Hkv]
    return dequantize_kv_ref(keys, scales[0]), dequantize_kv_ref(values, scales[1])


def paged_attention_quant_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                              scale: float) -> torch.Tensor:
    """Same contract as paged_attention_ref, reading a quantized cache."""
    out = torch.empty_like(q)
    block_size = kv_cache.shape[2]
    group = q.shape[1] // kv_cache.shape[3]
    starts = meta.query_start_loc_cpu
    for b, seq_len in enumerate(meta.seq_lens_cpu):
        q_b = q[starts[b]:starts[b + 1]].float()
        n_blocks = (seq_len + block_size - 1) // block_size
        keys, values = _sequence_kv(kv_cache, meta.block_tables[b, :n_blocks].long(), seq_len)
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_b, keys) * scale
        query_pos = torch.arange(seq_len - q_b.shape[0], seq_len, device=q.device).unsqueeze(1)
        key_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        probs = torch.softmax(scores.masked_fill(key_pos > query_pos, float("-inf")), dim=-1)
        out[starts[b]:starts[b + 1]] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


# ---- Triton kernels -----------------------------------------------------------------------------------------
# A copy of the float-cache write kernel (rotary.py: see its comments) that quantizes as it writes; attention runs
# paged_attention.py's kernels, whose KV_INT8 reads the scales.
# Cache arguments are the strides of the codes view (c_kv, c_blk, c_row, c_head: bytes); for int8 the scales of
# block blk sit at byte blk * c_blk + BLOCK_SIZE * c_row (right after its codes), float16 [Hkv, BLOCK_SIZE].
# With D % 16 == 0 every code row is 16-byte aligned and the strides divide by 16, which Triton specializes on,
# so K and V tiles load with 16-byte vectors (the old 130-byte rows allowed 2-byte loads: 731 us vs the bf16
# cache's 186 us at batch 64 x 2k on an H100); scales load as [BLOCK_N] vectors, contiguous within a block.
try:
    import triton.language as tl
except ImportError:  # triton is optional on CPU: the references above need only torch
    tl = None

from backend.kernels import paged_attention as pa
from backend.kernels._jit import lazy_jit


@lazy_jit
def _rotary_and_cache_quant_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, cache_ptr, slot_ptr, qo_ptr, ko_ptr,
                                   q_st, q_sh, k_st, k_sh, v_st, v_sh, cs_st,
                                   c_kv, c_blk, c_row, c_head, qo_st, qo_sh, ko_st, ko_sh,
                                   HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                                   BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                                   BLOCK_SIZE: tl.constexpr, KV_INT8: tl.constexpr):
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
    r1 = (k1 * cos - k2 * sin).to(ko_ptr.dtype.element_ty)
    r2 = (k2 * cos + k1 * sin).to(ko_ptr.dtype.element_ty)
    ko = ko_ptr + t * ko_st + hk * ko_sh + d[None, :]
    tl.store(ko, r1, mask=mk)
    tl.store(ko + HALF, r2, mask=mk)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    mc = mk & (slot >= 0)  # negative slots (padding) write nothing
    dst = cache_ptr + (slot // BLOCK_SIZE) * c_blk + (slot % BLOCK_SIZE) * c_row + hk * c_head
    v1 = tl.load(v_ptr + t * v_st + hk * v_sh + d[None, :], mask=mc, other=0.0).to(tl.float32)
    v2 = tl.load(v_ptr + t * v_st + hk * v_sh + HALF + d[None, :], mask=mc, other=0.0).to(tl.float32)
    # Keys (kv = 0) then values (kv = 1); a loop of two, as kernels here cannot call jitted helpers.
    for kv in tl.static_range(2):
        x1 = r1.to(tl.float32) if kv == 0 else v1
        x2 = r2.to(tl.float32) if kv == 0 else v2
        base = dst + kv * c_kv
        if KV_INT8:
            amax = tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1))
            scale = tl.maximum(amax / 127.0, 1e-6).to(tl.float16)
            sf = scale.to(tl.float32)[:, None]
            c1 = x1 / sf
            c2 = x2 / sf
            # round half away from zero (the reference rounds half to even: they differ only on exact ties)
            c1 = tl.minimum(tl.maximum(tl.where(c1 >= 0, tl.floor(c1 + 0.5), tl.ceil(c1 - 0.5)), -127.0), 127.0)
            c2 = tl.minimum(tl.maximum(tl.where(c2 >= 0, tl.floor(c2 + 0.5), tl.ceil(c2 - 0.5)), -127.0), 127.0)
            tl.store(base + d[None, :], c1.to(tl.int8), mask=mc)
            tl.store(base + HALF + d[None, :], c2.to(tl.int8), mask=mc)
            sdst = (cache_ptr + kv * c_kv + (slot // BLOCK_SIZE) * c_blk + BLOCK_SIZE * c_row).to(
                tl.pointer_type(tl.float16)) + hk * BLOCK_SIZE + slot % BLOCK_SIZE
            tl.store(sdst, scale[:, None], mask=(hk < HKV) & (slot >= 0))
        else:
            c1 = tl.minimum(tl.maximum(x1, -448.0), 448.0)
            c2 = tl.minimum(tl.maximum(x2, -448.0), 448.0)
            tl.store(base + d[None, :], c1.to(cache_ptr.dtype.element_ty), mask=mc)
            tl.store(base + HALF + d[None, :], c2.to(cache_ptr.dtype.element_ty), mask=mc)


def rotary_and_cache_quant_triton(q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping):
    """Same contract as rotary_and_cache_quant_ref (and rotary_and_cache_triton: strided q/k/v views, negative
    slots skipped). Specializations: Hq, Hkv, D, block size, dtypes, int8 or fp8 cache."""
    import triton

    if kv_cache.dtype == torch.int8:
        check_int8_layout(kv_cache)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    num_tokens, hq, head_dim = q.shape
    hkv = k.shape[1]
    out_q, out_k = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return out_q, out_k
    half = head_dim // 2
    _rotary_and_cache_quant_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping, out_q, out_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        out_q.stride(0), out_q.stride(1), out_k.stride(0), out_k.stride(1),
        HQ=hq, HKV=hkv, HALF=half, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HKV=triton.next_power_of_2(hkv),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_SIZE=kv_cache.shape[2], KV_INT8=kv_cache.dtype == torch.int8,
        num_warps=4)
    return out_q, out_k


def paged_attention_quant_triton(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                                 *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as paged_attention_quant_ref: paged_attention_triton's kernels and launches, whose KV_INT8
    reads the scales (the 8-bit caches use the bf16 tiles: with the aligned INT8 layout INT8 decode at batch
    64 x 2k took 169.5 us with the 128-key tile against 188.1 with the 64-key one the unaligned rows had needed,
    H100, perf/results/h100-kv-int8-tiles.json; in the shared kernel INT8 174 us, FP8 135 us, bf16 190 us)."""
    if kv_cache.dtype == torch.int8:
        check_int8_layout(kv_cache)  # the kernels find the scales right after each block's codes
    return pa.paged_attention_triton(q, kv_cache, meta, scale, out=out)


def quantized_kv_ops(base, kind: str):
    """The KernelOps `base` with the cache write and attention swapped for ones reading a `kind` cache."""
    import dataclasses

    if kind not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype {kind!r} is not one of auto, {', '.join(KV_DTYPES)}")
    if base.name == "triton":  # the decode kernel's own rotary writes 16-bit caches only
        return dataclasses.replace(base, rotary_and_cache=rotary_and_cache_quant_triton,
                                   paged_attention=paged_attention_quant_triton, name="triton",
                                   rotary_decode_attention=None)
    return dataclasses.replace(base, rotary_and_cache=rotary_and_cache_quant_ref,
                               paged_attention=paged_attention_quant_ref, rotary_decode_attention=None)
