"""Causal attention of the new tokens of each sequence over that sequence's paged KV cache.

One function covers prefill, chunked prefill after a cached prefix, and decode: the new tokens of a
sequence are the last `query_len` of its `seq_len` tokens, and each attends to every position up to its own.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from backend.engine.attention_metadata import AttentionMetadata


def gather_sequence_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first seq_len keys and values of one sequence: [seq_len, Hkv, D] each."""
    keys = kv_cache[0, block_ids].flatten(0, 1)[:seq_len]
    values = kv_cache[1, block_ids].flatten(0, 1)[:seq_len]
    return keys, values


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D]. Grouped-query heads: query head h reads KV head h // (Hq / Hkv)."""
    out = torch.empty_like(q)
    block_size = kv_cache.shape[2]
    group = q.shape[1] // kv_cache.shape[3]
    starts = meta.query_start_loc_cpu
    for b, seq_len in enumerate(meta.seq_lens_cpu):
        q_b = q[starts[b]:starts[b + 1]].float()
        n_blocks = (seq_len + block_size - 1) // block_size
        keys, values = gather_sequence_kv(kv_cache, meta.block_tables[b, :n_blocks].long(), seq_len)
        keys = keys.float().repeat_interleave(group, dim=1)
        values = values.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_b, keys) * scale
        query_pos = torch.arange(seq_len - q_b.shape[0], seq_len, device=q.device).unsqueeze(1)
        key_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[b]:starts[b + 1]] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


# ---- Triton kernels -----------------------------------------------------------------------------------------
# Both kernels fold the query heads that share one KV head into the rows of the query tile, so each K/V tile
# loaded from the paged cache serves the whole group (and tl.dot gets >= 16 rows even for decode).
# Row r of a tile is (token r // GROUP, head r % GROUP) of the sequence's new tokens.
# Online softmax in base 2 with the scale folded in, after FlashAttention-2 (Dao, 2023); the decode split
# along the context and the log-sum-exp merge follow Flash-Decoding (Dao et al., 2023) and the two-stage
# grouped decode kernels of lightllm/SGLang (decode_attention.py), written anew here.
try:
    import triton.language as tl

    from backend.kernels._pdl import gdc_launch_dependents, gdc_wait
except ImportError:  # triton is optional on CPU: the reference above needs only torch
    tl = None

from backend.kernels._jit import lazy_jit
from backend.kernels._pdl import pdl_args

_LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # upper bound of decode splits per (sequence, KV head): sizes the partial-result workspace


@lazy_jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, po_ptr, pl_ptr, out_ptr,
                         k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr,
                         q_st, q_sh, c_kv, c_blk, c_row, c_head, bt_st, po_sb, po_sh, po_ss, pl_sb, pl_sh,
                         o_st, o_sh, k_st, k_sh, v_st, v_sh, cs_st, num_splits, qk_scale,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         ONE_SPLIT: tl.constexpr, KV_INT8: tl.constexpr, ROTARY: tl.constexpr, PDL: tl.constexpr):
    # grid (num_seqs, Hkv, num_splits). Split s of sequence b covers keys [s * L, (s + 1) * L), where L is
    # cdiv(seq_len, num_splits) rounded up to BLOCK_N: computed here from the device seq_len, so the grid
    # needs no host knowledge of the lengths (CUDA-graph safe); splits past the end exit at once.
    # ONE_SPLIT (num_splits == 1, large batches): the program owns its heads' whole context, so it writes the
    # normalized output itself and no reduce runs (at batch 256 the reduce launch cost ~40 us per layer).
    # The 8-bit caches of kv_quant.py run this kernel too: codes convert to q's dtype for the dots (a no-op for
    # a 16-bit cache), and KV_INT8 applies each key's and value's scale after the dots, read from the block's
    # scale region (kv_quant's layout: float16 [Hkv, BLOCK_SIZE] right after the block's codes).
    # ROTARY (16-bit caches): q, k and v are the projection's raw rows, and this kernel does rotary.py's work for
    # the step: every program rotates its q heads, and the program that owns the last key (the new token's)
    # rotates that key, writes it and the value into the cache, and reads them back like any other key. One kernel
    # launch fewer per layer: the 8B batch-1 step 5.648 -> 5.599-5.613 ms on an H100 (perf/ablate_decode.py).
    if PDL:  # see _pdl.py: the next kernel may launch now; nothing here is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
    start = s * split_len
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    gm = g < GROUP
    qh = kvh * GROUP + g
    q_row = tl.load(qsl_ptr + b).to(tl.int64)
    if start >= seq_len:
        if ONE_SPLIT:  # an empty (padding) sequence gets zeros, as the reduce would give it
            tl.store(out_ptr + q_row * o_st + qh[:, None] * o_sh + d[None, :],
                     tl.zeros([GROUP_PAD, BLOCK_D], out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])
        return
    end = tl.minimum(start + split_len, seq_len)
    q = tl.load(q_ptr + q_row * q_st + qh[:, None] * q_sh + d[None, :],
                mask=(g[:, None] < GROUP) & dm[None, :], other=0.0)
    if ROTARY:
        # rotate-half over the whole row: element d pairs with d +- D/2, as rotary.py's halves do, in float32
        # with one rounding to q's dtype
        half = HEAD_DIM // 2
        low = d < half
        partner = tl.where(low, d + half, d - half)
        pos = tl.load(pos_ptr + q_row).to(tl.int64)
        cos = tl.load(cs_ptr + pos * cs_st + d % half, mask=dm, other=0.0)
        sin = tl.load(cs_ptr + pos * cs_st + half + d % half, mask=dm, other=0.0)
        sin = tl.where(low, -sin, sin)
        q_pair = tl.load(q_ptr + q_row * q_st + qh[:, None] * q_sh + partner[None, :],
                         mask=(g[:, None] < GROUP) & dm[None, :], other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_pair.to(tl.float32) * sin[None, :]).to(q.dtype)
        slot = tl.load(slot_ptr + q_row)
        if (end == seq_len) & (slot >= 0):  # this program owns the new token's key: into the cache first
            k_row = k_ptr + q_row * k_st + kvh * k_sh
            k_new = tl.load(k_row + d, mask=dm, other=0.0)
            k_pair = tl.load(k_row + partner, mask=dm, other=0.0)
            k_new = (k_new.to(tl.float32) * cos + k_pair.to(tl.float32) * sin).to(k_new.dtype)
            dst = cache_ptr + (slot // BLOCK_SIZE) * c_blk + (slot % BLOCK_SIZE) * c_row + kvh * c_head + d
            tl.store(dst, k_new.to(cache_ptr.dtype.element_ty), mask=dm)
            v_new = tl.load(v_ptr + q_row * v_st + kvh * v_sh + d, mask=dm, other=0.0)
            tl.store(dst + c_kv, v_new.to(cache_ptr.dtype.element_ty), mask=dm)
            tl.debug_barrier()  # the block's own writes are visible to all its threads' loads below
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    bt = bt_ptr + b.to(tl.int64) * bt_st
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        blk = tl.load(bt + n // BLOCK_SIZE, mask=nm, other=0).to(tl.int64)
        off = blk * c_blk + (n % BLOCK_SIZE) * c_row + kvh * c_head
        k = tl.load(cache_ptr + off[None, :] + d[:, None], mask=nm[None, :] & dm[:, None], other=0.0)
        scores = tl.dot(q, k.to(q.dtype)) * qk_scale
        if KV_INT8:
            sp = (cache_ptr + blk * c_blk + BLOCK_SIZE * c_row).to(tl.pointer_type(tl.float16)) \
                + kvh * BLOCK_SIZE + n % BLOCK_SIZE
            k_scale = tl.load(sp, mask=nm, other=0.0)
            v_scale = tl.load(sp + c_kv // 2, mask=nm, other=0.0)  # c_kv bytes on: the values' scales
            scores = scores * k_scale.to(tl.float32)[None, :]
        scores = tl.where(nm[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_INT8:
            p = p * v_scale.to(tl.float32)[None, :]
        v = tl.load(cache_ptr + c_kv + off[:, None] + d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    if ONE_SPLIT:
        tl.store(out_ptr + q_row * o_st + qh[:, None] * o_sh + d[None, :],
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])
    else:
        po = po_ptr + b * po_sb + qh[:, None] * po_sh + s * po_ss + d[None, :]
        tl.store(po, acc / l_i[:, None], mask=gm[:, None] & dm[None, :])
        tl.store(pl_ptr + b * pl_sb + qh * pl_sh + s, m_i + tl.log2(l_i), mask=gm)


@lazy_jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(po_ptr, pl_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
                          po_sb, po_sh, po_ss, pl_sb, pl_sh, o_st, o_sh, num_splits,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    # grid (num_seqs, Hq): merge the valid splits by their log-sum-exp (base 2). All splits are loaded at
    # once (SPLITS_PAD rows, the split count rounded up to a power of two): a loop over them was a chain of
    # dependent loads, slow for short contexts.
    if PDL:  # see _pdl.py: the next kernel may launch now; nothing here is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
    n_valid = tl.cdiv(seq_len, split_len)
    s = tl.arange(0, SPLITS_PAD)
    sm = s < n_valid
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(pl_ptr + b * pl_sb + h * pl_sh + s, mask=sm, other=float("-inf"))
    o = tl.load(po_ptr + b * po_sb + h * po_sh + s[:, None] * po_ss + d[None, :],
                mask=sm[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    w = tl.where(sm, tl.exp2(lse - tl.max(lse, axis=0)), 0.0)
    l_sum = tl.sum(w, axis=0)
    l_sum = tl.where(l_sum > 0, l_sum, 1.0)  # an empty (padding) sequence gets zeros, not NaN
    acc = tl.sum(w[:, None] * o, axis=0) / l_sum
    q_row = tl.load(qsl_ptr + b).to(tl.int64)
    tl.store(out_ptr + q_row * o_st + h * o_sh + d, acc.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@lazy_jit(do_not_specialize=["min_q_len", "max_q_len"])
def _prefill_kernel(q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
                    q_st, q_sh, c_kv, c_blk, c_row, c_head, bt_st, o_st, o_sh, qk_scale, min_q_len, max_q_len,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_INT8: tl.constexpr):
    # grid (num_seqs, Hkv, cdiv(max_query_len * GROUP, BLOCK_M)): one tile of (token, head) rows of one
    # sequence against its paged keys [0, last visible). Query token i sits at position ctx + i, where
    # ctx = seq_len - query_len (cached prefix and earlier chunks), and sees keys up to its own position.
    # 8-bit caches as in _decode_split_kernel: codes convert to q's dtype, KV_INT8 applies the scales.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    mt = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    # Sequences outside [min_q_len, max_q_len] belong to the other launch (see _prefill).
    if (mt * BLOCK_M >= q_len * GROUP) | (q_len < min_q_len) | (q_len > max_q_len):
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len
    r = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = r < q_len * GROUP
    tok = r // GROUP
    qh = kvh * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * q_st + qh[:, None] * q_sh + d[None, :],
                mask=rm[:, None] & dm[None, :], other=0.0)
    q_pos = ctx + tok
    end = ctx + tl.minimum((mt * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1) + 1
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt = bt_ptr + b.to(tl.int64) * bt_st
    for n0 in range(0, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        blk = tl.load(bt + n // BLOCK_SIZE, mask=nm, other=0).to(tl.int64)
        off = blk * c_blk + (n % BLOCK_SIZE) * c_row + kvh * c_head
        k = tl.load(cache_ptr + off[None, :] + d[:, None], mask=nm[None, :] & dm[:, None], other=0.0)
        scores = tl.dot(q, k.to(q.dtype)) * qk_scale
        if KV_INT8:
            sp = (cache_ptr + blk * c_blk + BLOCK_SIZE * c_row).to(tl.pointer_type(tl.float16)) \
                + kvh * BLOCK_SIZE + n % BLOCK_SIZE
            k_scale = tl.load(sp, mask=nm, other=0.0)
            v_scale = tl.load(sp + c_kv // 2, mask=nm, other=0.0)  # c_kv bytes on: the values' scales
            scores = scores * k_scale.to(tl.float32)[None, :]
        scores = tl.where((n[None, :] <= q_pos[:, None]) & nm[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_INT8:
            p = p * v_scale.to(tl.float32)[None, :]
        v = tl.load(cache_ptr + c_kv + off[:, None] + d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + q_rows[:, None] * o_st + qh[:, None] * o_sh + d[None, :], out,
             mask=rm[:, None] & dm[None, :])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclasses.dataclass(frozen=True)
class DecodeTile:
    """Launch shape of the decode split kernel (perf/tune_attention.py times the choices)."""
    block_n: int  # keys per loop iteration
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4  # how many split programs decode_num_splits aims for per SM


@dataclasses.dataclass(frozen=True)
class PrefillTile:
    """Launch shape of the prefill kernel's large-query launch (the small-tile launch for decode rows and
    short chunks is fixed); perf/tune_attention.py times the choices."""
    block_m: int = 64  # (token, head) rows per program
    block_n: int = 64  # keys per loop iteration
    num_warps: int = 4
    num_stages: int = 2


def default_decode_tile(block_d: int, num_seqs: int = 0) -> DecodeTile:
    if block_d <= 64:
        return DecodeTile(block_n=128)
    if block_d <= 128 and num_seqs == 1:
        # Batch 1 is a chain of latency-bound kernels, with the context cut into 64 splits of at least a tile:
        # 32-key tiles put a short context's keys on 4x the programs. In place in the 8B batch-1 step on an H100
        # (perf/ablate_decode.py dtile=..., perf/RESULTS.md session 11): 5.404-5.408 -> 5.371-5.377 ms (64 keys:
        # no gain); the standalone timing agrees at 1 x 4,096 tokens (14.0 us against 14.5 for 128 keys,
        # perf/results/h100-tune_attention.json).
        return DecodeTile(block_n=32, num_stages=2)
    if block_d <= 128:
        # perf/tune_attention.py, H100, 32/8 x 128: 128 keys and 4 stages beat 64 keys and 3 stages by
        # 5.6% at 256 x 352 tokens and 3-5% at batch 1-128, within 1.3% elsewhere (best of 36 on average)
        return DecodeTile(block_n=128, num_stages=4)
    return DecodeTile(block_n=32)


def decode_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device, programs_per_sm: int = 4) -> int:
    """Splits per (sequence, KV head) for decode: enough programs for `programs_per_sm` per SM, from shapes
    alone, so a CUDA graph captured for a batch size stays valid for any context length."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    return max(1, min(MAX_SPLITS, math.ceil(programs_per_sm * sms / max(1, num_seqs * num_kv_heads))))


def _alloc_workspace(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Float32 scratch for decode partials (a function so tests can poison it)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _attention_args(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple:
    return (q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            kv_cache.stride(3), meta.block_tables.stride(0))


def launch_decode(q, kv_cache, meta, qk_scale, out, block_d, tile: DecodeTile | None = None,
                  rotary: tuple | None = None) -> None:
    """The decode launch for 16-bit and 8-bit caches alike: split programs over (sequence, KV head, split),
    then the log-sum-exp merge -- skipped when there is one split, where the split kernel writes the output
    itself. rotary: (k, v, positions, cos_sin_cache, slot_mapping) when q, k, v are the projection's raw rows
    (rotary_decode_attention_triton)."""
    import triton

    if rotary is None:  # placeholders the kernel never reads
        k = v = cos_sin = q
        positions = slots = meta.slot_mapping
    else:
        k, v, positions, cos_sin, slots = rotary

    num_seqs, hq, head_dim = meta.num_seqs, q.shape[1], q.shape[2]
    hkv = kv_cache.shape[3]
    tile = tile or default_decode_tile(block_d, meta.num_seqs)
    splits = decode_num_splits(num_seqs, hkv, q.device, tile.programs_per_sm)
    one_split = splits == 1
    if one_split:  # no partials: the workspace arguments are placeholders the kernel never touches
        po, pl = out, out[:, :, 0]
    else:
        po = _alloc_workspace((num_seqs, hq, splits, head_dim), q.device)
        pl = _alloc_workspace((num_seqs, hq, splits), q.device)
    _decode_split_kernel[(num_seqs, hkv, splits)](
        q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, po, pl, out,
        k, v, positions, cos_sin, slots,
        *_attention_args(q, kv_cache, meta), po.stride(0), po.stride(1), po.stride(2),
        pl.stride(0), pl.stride(1), out.stride(0), out.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0), splits, qk_scale,
        GROUP=hq // hkv, GROUP_PAD=max(16, triton.next_power_of_2(hq // hkv)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=tile.block_n, BLOCK_SIZE=kv_cache.shape[2], ONE_SPLIT=one_split, num_warps=tile.num_warps,
        num_stages=tile.num_stages, KV_INT8=kv_cache.dtype == torch.int8, ROTARY=rotary is not None,
        **pdl_args(q.device))
    if not one_split:
        _decode_reduce_kernel[(num_seqs, hq)](
            po, pl, meta.seq_lens, meta.query_start_loc, out, po.stride(0), po.stride(1), po.stride(2),
            pl.stride(0), pl.stride(1), out.stride(0), out.stride(1), splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=tile.block_n,
            SPLITS_PAD=_splits_pad(splits), num_warps=4, **pdl_args(q.device))


def _splits_pad(splits: int) -> int:
    """Rows the reduce loads at once: the split count rounded up to a power of two (each masked row costs; at
    batch 64, two splits padded to 16 rows took 8 us per layer). One variant per width, all warmed up."""
    import triton

    return max(2, triton.next_power_of_2(splits))


def decode_variant_batch_sizes(num_kv_heads: int, device: torch.device) -> list[int]:
    """One batch size per decode kernel variant (each reduce width, and the one-split kernel), for warm-up
    to compile them all before live traffic. Batch 1, the only size with its own tile (default_decode_tile),
    is always the first of its variant."""
    first_of_variant: dict[tuple[bool, int], int] = {}
    for num_seqs in range(1, 64 * 1024):
        splits = decode_num_splits(num_seqs, num_kv_heads, device)
        first_of_variant.setdefault((splits == 1, _splits_pad(splits)), num_seqs)
        if splits == 1:
            break
    return sorted(first_of_variant.values())


def _decode(q, kv_cache, meta, qk_scale, out, group, block_d) -> None:
    launch_decode(q, kv_cache, meta, qk_scale, out, block_d)


def _prefill(q, kv_cache, meta, qk_scale, out, group, block_d, tile: PrefillTile | None = None) -> None:
    """Two launches over the batch: sequences whose rows (query_len * GROUP) fit one small tile (decodes and
    short chunks in a mixed batch) use BLOCK_M = 16 or the padded group, the rest the large tile. One tile
    size for all wasted 7/8 of a 128-row tile's dot products on each decode row group."""
    import triton

    # 64-row tiles, 4 warps by default: on an H100 128 rows / 8 warps was slower (1 x 4096 causal, 32/8 x 128:
    # 577 -> 621 us; 512 new after 3584 cached: 137 -> 179 us).
    tile = tile or (PrefillTile() if block_d <= 128 else PrefillTile(block_n=32))
    small_m = max(16, triton.next_power_of_2(group))
    small_q = small_m // group
    q_lens = [b - a for a, b in zip(meta.query_start_loc_cpu, meta.query_start_loc_cpu[1:])]
    small_n = 64 if block_d <= 128 else 32
    launches = []
    if min(q_lens) <= small_q:
        launches.append((small_m, small_n, 1, small_q, 1, 4, 2))
    if meta.max_query_len > small_q:
        launches.append((tile.block_m, tile.block_n, small_q + 1, meta.max_query_len,
                         triton.cdiv(meta.max_query_len * group, tile.block_m), tile.num_warps, tile.num_stages))
    for block_m, block_n, lo, hi, m_tiles, warps, stages in launches:
        _prefill_kernel[(meta.num_seqs, kv_cache.shape[3], m_tiles)](
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
            *_attention_args(q, kv_cache, meta), out.stride(0), out.stride(1), qk_scale, lo, hi,
            GROUP=group, HEAD_DIM=q.shape[2], BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_SIZE=kv_cache.shape[2], KV_INT8=kv_cache.dtype == torch.int8, num_warps=warps, num_stages=stages)


def rotary_decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                   cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                                   scale: float) -> torch.Tensor:
    """rotary_and_cache then paged_attention for a decode step (meta.decode_only) over a 16-bit cache, in the
    decode kernels alone: q [T, Hq, D], k and v [T, Hkv, D] are the projection's raw rows (views with unit stride
    along D). The cache gets the rotated k and v as rotary.py writes them; returns the attention output.

    Only where decode runs several splits per KV head (small batches, where every launch is latency): with one
    split (batch x KV heads fill the GPU) each program would rotate and write before its loop, and the batch-256
    step was slower that way than with rotary.py's own kernel (H100, 8B: 11.01 against 10.88-10.98 ms; the mixed
    workload 9,687-9,986 against 10,045-10,065 tok/s; perf/ablate_decode.py --workload mixed), so it takes that."""
    import triton

    if not meta.decode_only or kv_cache.element_size() == 1:
        raise ValueError("rotary_decode_attention_triton: decode steps over a 16- or 32-bit cache only")
    if decode_num_splits(meta.num_seqs, kv_cache.shape[3], q.device) == 1:
        from backend.kernels.rotary import rotary_and_cache_triton

        q, _ = rotary_and_cache_triton(q, k, v, positions, cos_sin_cache, kv_cache, meta.slot_mapping)
        return paged_attention_triton(q, kv_cache, meta, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.num_seqs == 0 or q.shape[0] == 0:
        return out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_d = max(16, triton.next_power_of_2(q.shape[2]))
    launch_decode(q, kv_cache, meta, scale * _LOG2E, out, block_d,
                  rotary=(k, v, positions, cos_sin_cache, meta.slot_mapping))
    return out


def paged_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                           *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as paged_attention_ref. q [T, Hq, D] (unit stride along D).

    meta.max_query_len == 1 takes the decode path: grid (num_seqs, Hkv, decode_num_splits(...)) plus, with
    more than one split, a reduce over (num_seqs, Hq); nothing is read on the host, so it can be captured in a
    CUDA graph.
    Otherwise the prefill path (also mixed prefill + decode batches): grid from meta.max_query_len.
    Specializations: GROUP = Hq / Hkv, D, kv block size, dtypes (tile sizes follow from D and GROUP);
    prefill has two (small and large query tiles); decode has the split kernel with its own epilogue (one
    split) or with partials, and a reduce per width (see decode_variant_batch_sizes).
    """
    import triton

    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    if meta.num_seqs == 0 or q.shape[0] == 0:
        return out
    group = q.shape[1] // kv_cache.shape[3]
    block_d = max(16, triton.next_power_of_2(q.shape[2]))
    run = _decode if meta.max_query_len == 1 else _prefill
    run(q, kv_cache, meta, scale * _LOG2E, out, group, block_d)
    return out
