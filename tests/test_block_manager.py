"""BlockManager: allocation, ref counts, all-or-nothing, prefix hashing and LRU eviction. Pure Python."""
import pytest

from backend.engine.block_manager import BlockManager, CachedPrefix, hash_block

BS = 4


def tokens(n, start=0):
    return list(range(start, start + n))


def compute(bm, request_id, token_ids):
    """Allocate for all tokens and mark them computed, as a finished prefill would."""
    assert bm.allocate(request_id, len(token_ids))
    bm.cache_full_blocks(request_id, token_ids, len(token_ids))


def test_allocate_grows_and_free_returns_everything():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    assert bm.allocate("a", 5)
    assert len(bm.block_table("a")) == 2
    assert bm.allocate("a", 8)  # still fits in 2 blocks
    assert len(bm.block_table("a")) == 2
    assert bm.allocate("a", 9)
    assert len(bm.block_table("a")) == 3
    assert bm.allocate("b", 1)
    assert bm.num_used_blocks == 4 and bm.num_free_blocks == 4
    assert set(bm.block_table("a")).isdisjoint(bm.block_table("b"))
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == bm.num_total_blocks == 8
    assert bm.num_used_blocks == 0
    assert bm.block_table("a") == []


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    assert bm.allocate("a", 3 * BS)
    before = bm.block_table("a")
    assert not bm.allocate("a", 5 * BS)  # needs 2 more, only 1 free
    assert bm.block_table("a") == before
    assert not bm.allocate("b", 2 * BS)
    assert not bm.has_blocks("b")
    assert bm.num_free_blocks == 1
    assert bm.allocate("b", BS)
    assert bm.num_free_blocks == 0


def test_free_unknown_request_is_harmless():
    bm = BlockManager(num_blocks=2, block_size=BS, enable_prefix_caching=True)
    bm.free("nobody")
    assert bm.num_free_blocks == 2


def test_shared_prefix_blocks_are_ref_counted():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    prompt = tokens(3 * BS)
    compute(bm, "a", prompt)
    hit = bm.find_cached_prefix(prompt + [99])
    assert hit.num_tokens == 3 * BS and hit.block_ids == tuple(bm.block_table("a"))
    assert bm.allocate("b", len(prompt) + 1, hit)
    table_b = bm.block_table("b")
    assert table_b[:3] == bm.block_table("a")
    assert bm.num_used_blocks == 4  # 3 shared + 1 fresh
    bm.free("a")
    assert bm.num_used_blocks == 4  # b still holds the shared ones
    assert bm.num_cached_blocks == 0
    bm.free("b")
    assert bm.num_used_blocks == 0
    assert bm.num_cached_blocks == 3  # the shared prefix stays findable
    assert bm.num_free_blocks == 8
    assert bm.prefix_cache_hit_blocks == 3 and bm.prefix_cache_hit_tokens == 3 * BS
    assert bm.prefix_cache_query_tokens == 3 * BS + 1


def test_lookup_never_covers_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    prompt = tokens(2 * BS)
    compute(bm, "a", prompt)
    hit = bm.find_cached_prefix(prompt)  # exactly 2 full cached blocks, but one token must be computed
    assert hit.num_tokens == BS
    assert bm.find_cached_prefix(prompt + [7]).num_tokens == 2 * BS


def test_lookup_changes_nothing_and_disabled_cache_finds_nothing():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    compute(bm, "a", tokens(2 * BS))
    bm.free("a")
    used, free = bm.num_used_blocks, bm.num_free_blocks
    assert bm.find_cached_prefix(tokens(3 * BS)).num_tokens == 2 * BS
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.prefix_cache_query_tokens) == (used, free, 0)

    off = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    compute(off, "a", tokens(2 * BS))
    assert off.find_cached_prefix(tokens(3 * BS)) == CachedPrefix()


def test_hash_chains_on_parent():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    shared_tail = [50, 51, 52, 53]
    compute(bm, "a", [1, 2, 3, 4] + shared_tail)
    # Same second block, different first block: nothing matches, not even the second block.
    assert bm.find_cached_prefix([9, 9, 9, 9] + shared_tail + [0]).num_tokens == 0
    assert bm.find_cached_prefix([1, 2, 3, 4] + shared_tail + [0]).num_tokens == 2 * BS
    assert hash_block(b"", shared_tail) != hash_block(hash_block(b"", [1, 2, 3, 4]), shared_tail)
    # A differing token inside the first block breaks the chain at block 0.
    assert bm.find_cached_prefix([1, 2, 3, 5] + shared_tail + [0]).num_tokens == 0


def test_only_full_computed_blocks_are_cached():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    prompt = tokens(2 * BS + 2)
    assert bm.allocate("a", len(prompt))
    bm.cache_full_blocks("a", prompt, BS + 1)  # only block 0 is fully computed
    assert bm.find_cached_prefix(prompt).num_tokens == BS
    bm.cache_full_blocks("a", prompt, len(prompt))  # block 2 is partial: not cached
    assert bm.find_cached_prefix(prompt + tokens(10, 100)).num_tokens == 2 * BS


def test_cached_blocks_are_evicted_lru_tail_first():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    prompt = tokens(3 * BS)
    compute(bm, "a", prompt)
    bm.free("a")
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 4
    assert bm.allocate("b", BS)  # takes the never-used block first
    assert bm.find_cached_prefix(prompt + [0]).num_tokens == 3 * BS
    assert bm.allocate("c", BS)  # must evict: the tail block (freed first) goes
    assert bm.find_cached_prefix(prompt + [0]).num_tokens == 2 * BS
    assert bm.allocate("d", BS)
    assert bm.find_cached_prefix(prompt + [0]).num_tokens == BS
    assert bm.num_cached_blocks == 1 and bm.num_free_blocks == 1


def test_cache_hit_takes_block_out_of_lru():
    bm = BlockManager(num_blocks=3, block_size=BS, enable_prefix_caching=True)
    prompt = tokens(2 * BS)
    compute(bm, "a", prompt)
    bm.free("a")
    hit = bm.find_cached_prefix(prompt + [1])
    assert hit.num_tokens == 2 * BS
    # 2 cached blocks + 1 fresh: exactly the pool; the hit blocks must not also count as room.
    assert not bm.allocate("b", 4 * BS, hit)
    assert not bm.has_blocks("b") and bm.num_cached_blocks == 2
    assert bm.allocate("b", 3 * BS, hit)
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 0
    assert bm.block_table("b")[:2] == list(hit.block_ids)
    bm.free("b")
    assert bm.num_free_blocks == 3


def test_duplicate_prefix_computed_twice_is_cached_once():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    prompt = tokens(2 * BS)
    compute(bm, "a", prompt)
    compute(bm, "b", prompt)  # computed concurrently, before it could hit a's blocks
    bm.free("b")
    assert bm.num_cached_blocks == 0  # b's copies carry no hash: plain free blocks
    bm.free("a")
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 8


def test_evicted_then_reused_block_is_rehashed_correctly():
    bm = BlockManager(num_blocks=2, block_size=BS, enable_prefix_caching=True)
    compute(bm, "a", tokens(2 * BS))
    bm.free("a")
    compute(bm, "b", tokens(2 * BS, start=100))  # evicts both of a's blocks
    bm.free("b")
    assert bm.find_cached_prefix(tokens(2 * BS) + [0]).num_tokens == 0
    assert bm.find_cached_prefix(tokens(2 * BS, start=100) + [0]).num_tokens == 2 * BS


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=bad, block_size=BS, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=bad, enable_prefix_caching=True)
