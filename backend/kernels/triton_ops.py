"""The Triton-kernel KernelOps, and `warmup` to compile every launch specialization at engine load.

What a kernel is compiled for (its specialization key): the constexprs listed in each wrapper's docstring,
the dtypes of its tensors, and, for integer arguments, whether they equal 1 or divide by 16 (pointers: 16-byte
alignment). Within one engine all of these are fixed by the model and cache config, except:
  - the attention path: decode (meta.max_query_len == 1) or prefill, and within decode the one-split kernel
    and the reduce widths, which follow from the batch size; all are warmed up;
  - per-step integers that would flip that divisibility: the decode split count is marked
    do_not_specialize, and token counts, sequence lengths and query lengths never reach a kernel as
    integers (grids, or device tensors read inside);
  - q/k/v views of the fused qkv output: their strides and offsets are those of the model's projection,
    so warm up with the same layout (`warmup` builds q, k, v exactly that way).
Passing residual=None to rms_norm is a second variant (HAS_RESIDUAL); both are warmed up. Decode steps over a
16-bit cache run rotary inside the decode kernel (rotary_decode_attention, its ROTARY variants), warmed up too.
"""
from __future__ import annotations

import torch

from backend.engine.attention_metadata import AttentionMetadata
from backend.engine.ops import KernelOps
from backend.kernels.activation import silu_and_mul_triton
from backend.kernels.paged_attention import paged_attention_triton, rotary_decode_attention_triton
from backend.kernels.rms_norm import rms_norm_quant_triton, rms_norm_triton
from backend.kernels.rotary import rotary_and_cache_triton

TRITON_OPS = KernelOps(rms_norm=rms_norm_triton, silu_and_mul=silu_and_mul_triton,
                       rotary_and_cache=rotary_and_cache_triton, paged_attention=paged_attention_triton,
                       name="triton", rms_norm_quant=rms_norm_quant_triton,
                       rotary_decode_attention=rotary_decode_attention_triton)


def _warmup_meta(block_size: int, query_len: int, device: torch.device, num_seqs: int = 1) -> AttentionMetadata:
    """`num_seqs` sequences with a 3-token cached prefix and `query_len` new tokens each, all in blocks 0 and
    up (they share the blocks and write the same slots: warm-up only needs the launches)."""
    seq_len = 3 + query_len
    n_blocks = -(-seq_len // block_size)
    slots = torch.arange(3, seq_len, dtype=torch.int64, device=device).repeat(num_seqs)
    starts = [i * query_len for i in range(num_seqs + 1)]
    return AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device),
        block_tables=torch.arange(n_blocks, dtype=torch.int32, device=device).view(1, -1).repeat(num_seqs, 1),
        max_query_len=query_len, max_seq_len=seq_len, query_start_loc_cpu=starts,
        seq_lens_cpu=[seq_len] * num_seqs)


def warmup(*, hidden_size: int, intermediate_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
           kv_cache: torch.Tensor, dtype: torch.dtype, eps: float = 1e-6, max_position: int = 64,
           ops: KernelOps = TRITON_OPS) -> None:
    """Launches every kernel variant of `ops` once on tiny inputs of the model's layout (compiles them all):
    both RMSNorm variants, SiLU-and-mul, the cache write, decode attention at one batch size per decode
    kernel variant (see paged_attention.decode_variant_batch_sizes), prefill with small and large query tiles.

    kv_cache: a real layer cache (its strides are part of the key); it is written only at slots 3..42,
    in its first blocks: call this before serving (or give it spare blocks at the front).
    """
    from backend.kernels.paged_attention import decode_variant_batch_sizes

    device = kv_cache.device
    x = torch.randn(4, hidden_size, dtype=dtype, device=device)
    weight = torch.ones(hidden_size, dtype=dtype, device=device)
    ops.rms_norm(x, weight, eps)
    ops.rms_norm(x, weight, eps, torch.randn_like(x))
    ops.silu_and_mul(torch.randn(4, 2 * intermediate_size, dtype=dtype, device=device))
    cos_sin = torch.randn(max_position, head_dim, dtype=torch.float32, device=device)
    sizes = [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    decode = [(1, n) for n in decode_variant_batch_sizes(num_kv_heads, device)]
    for query_len, num_seqs in decode + [(2, 1), (40, 1)]:
        meta = _warmup_meta(kv_cache.shape[2], query_len, device, num_seqs)
        tokens = query_len * num_seqs
        # q, k, v as views of one fused qkv output, like the model's projection gives them
        qkv = torch.randn(tokens, sum(sizes), dtype=dtype, device=device)
        q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split(sizes, dim=-1))
        positions = torch.arange(3, 3 + query_len, device=device).repeat(num_seqs)
        if query_len == 1 and ops.rotary_decode_attention is not None:
            ops.rotary_decode_attention(q, k, v, positions, cos_sin, kv_cache, meta, head_dim ** -0.5)
        q, _ = ops.rotary_and_cache(q, k, v, positions, cos_sin, kv_cache, meta.slot_mapping)
        ops.paged_attention(q, kv_cache, meta, head_dim ** -0.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
