"""Causal attention of the new tokens of each sequence over that sequence's paged KV cache.

One function covers prefill, chunked prefill after a cached prefix, and decode: the new tokens of a
sequence are the last `query_len` of its `seq_len` tokens, and each attends to every position up to its own.
"""
from __future__ import annotations

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
        query_pos = torch.arange(seq_len - q_b.shape[0], seq_len).unsqueeze(1)
        key_pos = torch.arange(seq_len).unsqueeze(0)
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[b]:starts[b + 1]] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out
