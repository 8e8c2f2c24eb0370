"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts, a free list and a prefix cache.

Pure Python, no torch: the model runner owns the KV tensors; this only decides which block ids a request's
positions live in. Block `i` of a request's table holds positions [i * block_size, (i + 1) * block_size).

Prefix caching (the idea of vLLM's automatic prefix caching, written anew here): once a block is full and all
its tokens are computed, it gets a hash chained on its parent block's hash and its own token ids, so a hash
names the whole prefix up to the end of that block. A later request whose prefix hashes the same reuses the
block instead of recomputing it. Freed blocks that carry a hash stay cached in an LRU (ref count 0) and are
only evicted when a new allocation needs their space; a cache hit takes a block back out of that LRU.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Sequence

# The root's "parent hash". Every real hash is a 32-byte digest, so no real block can collide with it.
_ROOT_HASH = b""


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """The chained hash of one full block.

    sha256 rather than Python's hash(): tuple/int hashing is not collision-resistant, and a crafted collision
    would let one tenant's prompt read another's KV cache. It costs ~1 us per full block (16 tokens), i.e.
    well under 0.1 us per token.
    """
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


@dataclass(frozen=True)
class CachedPrefix:
    """The result of a prefix-cache lookup: reusable full blocks at the start of a token sequence."""

    block_ids: tuple[int, ...] = ()
    block_hashes: tuple[bytes, ...] = ()
    num_tokens: int = 0  # tokens covered by block_ids (a multiple of block_size)
    num_query_tokens: int = 0  # tokens that were looked up, for the hit rate


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest first
        self._cached: dict[bytes, int] = {}  # hash -> block id
        self._tables: dict[str, list[int]] = {}
        self._table_hashes: dict[str, list[bytes]] = {}  # hashes of each request's leading full blocks
        self.prefix_cache_hit_blocks = 0
        self.prefix_cache_hit_tokens = 0
        self.prefix_cache_query_tokens = 0

    # ---- counters ----
    @property
    def num_total_blocks(self) -> int:
        return len(self._ref_counts)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: never used plus cached-but-evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks still holding a reusable prefix."""
        return len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty if it holds no blocks)."""
        return list(self._tables.get(request_id, ()))

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._tables

    # ---- prefix cache ----
    def find_cached_prefix(self, token_ids: Sequence[int]) -> CachedPrefix:
        """Longest run of cached full blocks at the start of token_ids; changes nothing.

        Never covers the last token: the model must compute at least one token to produce the next one's logits.
        """
        if not self.enable_prefix_caching:
            return CachedPrefix()
        block_ids: list[int] = []
        hashes: list[bytes] = []
        parent = _ROOT_HASH
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            block_ids.append(block_id)
            hashes.append(parent)
        return CachedPrefix(tuple(block_ids), tuple(hashes), len(block_ids) * bs, len(token_ids))

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Hash the request's blocks that are full and fully computed, and make them findable."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        hashes = self._table_hashes[request_id]
        bs = self.block_size
        num_full = min(num_computed_tokens // bs, len(table))
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else _ROOT_HASH
            block_hash = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            hashes.append(block_hash)  # kept for chaining even if another block already holds this prefix
            block_id = table[i]
            if block_hash not in self._cached and self._hashes[block_id] is None:
                self._hashes[block_id] = block_hash
                self._cached[block_hash] = block_id

    # ---- allocation ----
    def allocate(self, request_id: str, num_tokens: int, cached: CachedPrefix | None = None) -> bool:
        """Grow the request's table to hold num_tokens tokens, all or nothing.

        `cached` (from find_cached_prefix, only for a request holding no blocks yet) is taken as the table's head.
        Returns False and changes nothing if free plus evictable blocks do not suffice.
        """
        table = self._tables.get(request_id)
        if cached is None and table is not None and len(table) * self.block_size >= num_tokens:
            return True  # the common decode step: 15 of 16 steps need no new block
        if cached is not None and cached.block_ids and table:
            raise ValueError(f"request {request_id!r} already holds blocks; a cached prefix only starts a table")
        cached_ids = cached.block_ids if cached is not None else ()
        held = len(table) if table else len(cached_ids)
        num_fresh = max(0, self.blocks_needed(num_tokens) - held)
        # Cached blocks that sit in the LRU stop being evictable once taken, so they do not count as room.
        reclaimed = sum(1 for block_id in cached_ids if block_id in self._evictable)
        if num_fresh > self.num_free_blocks - reclaimed:
            return False
        if table is None:
            table = self._tables[request_id] = []
            self._table_hashes[request_id] = []
        if cached is not None:
            self._take_cached(request_id, cached)
        table.extend(self._take_fresh() for _ in range(num_fresh))
        return True

    def free(self, request_id: str) -> None:
        """Drop the request's references, tail first, so its tail blocks are the first evicted."""
        table = self._tables.pop(request_id, None)
        self._table_hashes.pop(request_id, None)
        for block_id in reversed(table or ()):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            if self._hashes[block_id] is not None:
                self._evictable[block_id] = None
            else:
                self._free.append(block_id)

    def _take_cached(self, request_id: str, cached: CachedPrefix) -> None:
        for block_id in cached.block_ids:
            self._evictable.pop(block_id, None)
            self._ref_counts[block_id] += 1
        self._tables[request_id].extend(cached.block_ids)
        self._table_hashes[request_id].extend(cached.block_hashes)
        if cached.num_query_tokens:
            self.prefix_cache_hit_blocks += len(cached.block_ids)
            self.prefix_cache_hit_tokens += cached.num_tokens
            self.prefix_cache_query_tokens += cached.num_query_tokens

    def _take_fresh(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)  # least recently freed
            del self._cached[self._hashes[block_id]]
            self._hashes[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id
