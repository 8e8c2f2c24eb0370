"""The Triton-kernel KernelOps, and `warmup` to compile every launch specialization at engine load.

What a kernel is compiled for (its specialization key): the constexprs listed in each wrapper's docstring,
the dtypes of its tensors, and, for integer arguments, whether they equal 1 or divide by 16 (pointers: 16-byte
alignment). Within one engine all of these are fixed by the model and cache config, except:
  - the attention path: decode (meta.max_query_len == 1) or prefill; both are warmed up;
  - per-step integers that would flip that divisibility: the decode split count is marked
    do_not_specialize, and token counts, sequence lengths and query lengths never reach a kernel as
    integers (grids, or device tensors read inside);
  - q/k/v views of the fused qkv output: their strides and offsets are those of the model's projection,
    so warm up with the same layout (`warmup` builds q, k, v exactly that way).
Passing residual=None to rms_norm is a second variant (HAS_RESIDUAL); both are warmed up.
"""
from __future__ import annotations

import torch

from backend.engine.attention_metadata import AttentionMetadata
from backend.engine.ops import KernelOps
from backend.kernels.activation import silu_and_mul_triton
from backend.kernels.paged_attention import paged_attention_triton
from backend.kernels.rms_norm import rms_norm_triton
from backend.kernels.rotary import rotary_and_cache_triton

TRITON_OPS = KernelOps(rms_norm=rms_norm_triton, silu_and_mul=silu_and_mul_triton,
                       rotary_and_cache=rotary_and_cache_triton, paged_attention=paged_attention_triton,
                       name="triton")


def _warmup_meta(block_size: int, query_len: int, device: torch.device) -> AttentionMetadata:
    """One sequence with a 3-token cached prefix and `query_len` new tokens, in blocks 0 and up."""
    seq_len = 3 + query_len
    n_blocks = -(-seq_len // block_size)
    slots = torch.arange(3, seq_len, dtype=torch.int64, device=device)
    return AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.tensor([0, query_len], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=device),
        block_tables=torch.arange(n_blocks, dtype=torch.int32, device=device).view(1, -1),
        max_query_len=query_len, max_seq_len=seq_len, query_start_loc_cpu=[0, query_len],
        seq_lens_cpu=[seq_len])


def warmup(*, hidden_size: int, intermediate_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
           kv_cache: torch.Tensor, dtype: torch.dtype, eps: float = 1e-6, max_position: int = 64) -> None:
    """Launches every kernel variant once on tiny inputs of the model's layout (compiles them all).

    kv_cache: a real layer cache (its strides are part of the key); it is written only at slots 3..42,
    in its first blocks: call this before serving (or give it spare blocks at the front).
    """
    device = kv_cache.device
    x = torch.randn(4, hidden_size, dtype=dtype, device=device)
    weight = torch.ones(hidden_size, dtype=dtype, device=device)
    rms_norm_triton(x, weight, eps)
    rms_norm_triton(x, weight, eps, torch.randn_like(x))
    silu_and_mul_triton(torch.randn(4, 2 * intermediate_size, dtype=dtype, device=device))
    cos_sin = torch.randn(max_position, head_dim, dtype=torch.float32, device=device)
    for query_len in (1, 2, 40):  # decode; prefill small tiles; prefill large tiles
        meta = _warmup_meta(kv_cache.shape[2], query_len, device)
        qkv = torch.randn(query_len, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
        q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        positions = torch.arange(3, 3 + query_len, device=device)
        q, k = rotary_and_cache_triton(q.view(query_len, num_q_heads, head_dim),
                                       k.view(query_len, num_kv_heads, head_dim),
                                       v.view(query_len, num_kv_heads, head_dim), positions, cos_sin, kv_cache,
                                       meta.slot_mapping)
        paged_attention_triton(q, kv_cache, meta, head_dim ** -0.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
