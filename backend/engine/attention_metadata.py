"""How the new tokens of one step map onto sequences and onto the paged KV cache.

KV cache layout, one tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = keys, 1 = values). Token t of a sequence lives in block block_table[t // block_size], row
t % block_size; its flat slot is block_id * block_size + t % block_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (flattened over the batch)
    query_start_loc: torch.Tensor  # [B + 1] int32: new tokens of sequence b are rows [q[b], q[b+1])
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache for b after this step (context + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, rows padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so that torch reference paths need not synchronize with the device.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1
