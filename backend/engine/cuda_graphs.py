"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

At batch 1 an 8B-model decode step launches a few hundred kernels; launched one by one from Python that
costs more than the 5 ms the weights take to read. A graph per bucket (captured at load, after every kernel
specialization has compiled) replays them with one launch. Inputs live in static buffers; a batch is padded
up to its bucket with rows that write their K/V to a scratch slot nobody reads and attend to one token.
"""
from __future__ import annotations

import logging
import time

import torch

from .attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 32: padding wastes at most ~12% of a large batch."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(96, max_batch + 32, 32))
    return sorted({min(s, max_batch) for s in sizes})


class DecodeGraphs:
    """Captures model forward + logits for decode batches of each bucket size; replay() runs one."""

    def __init__(self, model, kv_caches: list[torch.Tensor], max_batch: int, max_blocks_per_seq: int,
                 scratch_slot: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = max_blocks_per_seq
        self.scratch_slot = scratch_slot
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def _meta(self, bs: int) -> AttentionMetadata:
        max_seq_len = self.max_blocks * self.kv_caches[0].shape[2]
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=max_seq_len, query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[1] * bs)

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs), self.kv_caches)
        return self.model.compute_logits(hidden, float32=False)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for bs in reversed(self.buckets):  # largest first, so the smaller ones fit in its memory pool
            self._forward(bs)  # eager run first: compiles kernels and sets up cuBLAS outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        log.info("captured %d decode graphs (batch %s) in %.1f s", len(self.buckets), self.buckets,
                 self.capture_seconds)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def fits(self, batch: int, widest_table: int) -> bool:
        return bool(self.graphs) and self.bucket_for(batch) is not None and widest_table <= self.max_blocks

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               seq_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Inputs for `batch` real rows (already on the device); returns their logits [batch, V]."""
        batch = input_ids.shape[0]
        bs = self.bucket_for(batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(slots)
        self.slot_mapping[batch:bs].fill_(self.scratch_slot)
        self.seq_lens[:batch].copy_(seq_lens)
        self.seq_lens[batch:bs].fill_(1)
        self.block_tables[:batch, :block_tables.shape[1]].copy_(block_tables)
        self.graphs[bs].replay()
        return self.logits[bs][:batch]
