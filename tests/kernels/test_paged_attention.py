import pytest
import torch

from backend.engine.attention_metadata import AttentionMetadata
from backend.kernels import paged_attention as pa
from backend.kernels.paged_attention import paged_attention_ref, paged_attention_triton

ON_GPU = torch.cuda.is_available()
# Interpreter: no bf16 (its tl.dot on bf16 is broken); the GPU runs bf16 and fp16 (fp32 would be tf32 there).
DTYPES = [(torch.bfloat16, 3e-2, 3e-2), (torch.float16, 4e-3, 4e-3)] if ON_GPU else \
    [(torch.float32, 1e-4, 1e-4), (torch.float16, 4e-3, 4e-3)]

# (sequences as (seq_len, query_len), Hq, Hkv, head_dim, block_size)
CPU_CASES = [
    ([(1, 1)], 4, 4, 16, 16),                                  # a one-token sequence
    ([(17, 1), (33, 1), (130, 1)], 6, 2, 32, 16),              # decode, lengths off the tile
    ([(19, 19), (7, 7)], 9, 3, 16, 32),                        # prefill
    ([(100, 1), (64, 1)], 9, 3, 16, 32),                       # decode, group of 3, block 32
    ([(50, 13)], 6, 2, 24, 16),                                # cached prefix + chunk, head_dim not 2^k
    ([(30, 30), (45, 1), (64, 9), (5, 1)], 9, 3, 32, 16),      # mixed prefill / chunk / decode
    ([(40, 2), (70, 6), (33, 33)], 8, 1, 16, 16),              # group 8: 2-token chunk in the small tile
    # 8 sequences x 2 KV heads fill the CPU's split target (4 "SMs" x 4): one split, no reduce
    ([(5, 1), (40, 1), (17, 1), (64, 1), (1, 1), (33, 1), (16, 1), (90, 1)], 6, 2, 16, 16),
]
GPU_CASES = [
    ([(1, 1), (2000, 1), (7, 1), (513, 1)], 32, 8, 128, 16),
    ([(5000, 1)], 6, 2, 128, 32),                              # one long request: the split path
    ([(1000, 1)] * 37, 9, 3, 64, 16),
    ([(777, 777), (300, 77), (64, 1), (1025, 1)], 32, 8, 128, 16),
    ([(2049, 333), (90, 90)], 9, 3, 64, 32),
    ([(4100, 4100)], 6, 2, 128, 16),
    ([(300 + 7 * i, 1) for i in range(70)], 32, 8, 128, 16),  # 560 programs: one split on an H100/H200
]
CASES = CPU_CASES + (GPU_CASES if ON_GPU else [])


def make_batch(seqs, hkv, head_dim, block_size, dtype, device, spare_blocks=5):
    """A random paged cache with shuffled block tables, and the metadata of one step over `seqs`."""
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in seqs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32)
    slots, at = [], 0
    for b, ((seq_len, q_len), n) in enumerate(zip(seqs, blocks_per_seq)):
        tables[b, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
        slots += [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
        block_tables=tables.to(device), max_query_len=max(q for _, q in seqs),
        max_seq_len=max(s for s, _ in seqs), query_start_loc_cpu=starts, seq_lens_cpu=[s for s, _ in seqs])
    kv_cache = torch.randn(2, num_blocks, block_size, hkv, head_dim, dtype=dtype, device=device)
    return kv_cache, meta


@pytest.fixture
def poisoned_workspace(monkeypatch):
    """Decode partials start as NaN, so a read of a split nobody wrote shows up in the output."""
    def alloc(shape, device):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    monkeypatch.setattr(pa, "_alloc_workspace", alloc)


def reference(q, kv_cache, meta, scale):
    return paged_attention_ref(q.float(), kv_cache.float(), meta, scale)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("seqs,hq,hkv,head_dim,block_size", CASES)
def test_paged_attention(seqs, hq, hkv, head_dim, block_size, dtype, atol, rtol, device, poisoned_workspace):
    kv_cache, meta = make_batch(seqs, hkv, head_dim, block_size, dtype, device)
    q = torch.randn(meta.query_start_loc_cpu[-1], hq, head_dim, dtype=dtype, device=device)
    out = torch.full_like(q, float("nan"))
    scale = head_dim ** -0.5

    got = paged_attention_triton(q, kv_cache, meta, scale, out=out)

    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.float(), reference(q, kv_cache, meta, scale), atol=atol, rtol=rtol)


@pytest.mark.parametrize("num_seqs", [2, 300 if ON_GPU else 8])
def test_decode_padding_sequence_gives_zeros(num_seqs, device, poisoned_workspace):
    # A CUDA graph's batch is padded with empty sequences (seq_len 0): they must not produce NaN. With few
    # sequences the reduce writes their rows; with many there is one split and the split kernel does.
    seqs = [(20 + i, 1) for i in range(num_seqs)]
    kv_cache, meta = make_batch(seqs, 2, 16, 16, torch.float32, device)
    splits = pa.decode_num_splits(num_seqs, 2, torch.device(device))
    assert (splits == 1) == (num_seqs > 2)
    meta.seq_lens[-1] = 0
    q = torch.randn(num_seqs, 4, 16, device=device)
    got = paged_attention_triton(q, kv_cache, meta, 0.25, out=torch.full_like(q, float("nan")))
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))
    meta.seq_lens_cpu[-1] = 1
    tol = 5e-3 if ON_GPU else 1e-4
    torch.testing.assert_close(got[:-1], reference(q, kv_cache, meta, 0.25)[:-1], atol=tol, rtol=tol)


def test_decode_variant_batch_sizes_cover_every_variant(device):
    dev = torch.device(device)
    chosen = pa.decode_variant_batch_sizes(8, dev)

    def variant(n):
        splits = pa.decode_num_splits(n, 8, dev)
        return splits == 1, pa._splits_pad(splits)
    assert len({variant(n) for n in chosen}) == len(chosen)
    assert {variant(n) for n in chosen} == {variant(n) for n in range(1, 2049)}
    assert 1 in chosen  # batch 1 has a tile of its own (default_decode_tile)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_replays_in_cuda_graph():
    """Captured once, replayed after the lengths and block tables change in place: no host reads inside."""
    device = torch.device("cuda")
    kv_cache, meta = make_batch([(300, 1), (40, 1), (2600, 1)], 2, 128, 16, torch.bfloat16, device, 200)
    q = torch.randn(3, 6, 128, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(q)
    paged_attention_triton(q, kv_cache, meta, 0.1, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_triton(q, kv_cache, meta, 0.1, out=out)
    _, new = make_batch([(2500, 1), (1, 1), (77, 1)], 2, 128, 16, torch.bfloat16, device, 0)
    meta.seq_lens.copy_(new.seq_lens)
    meta.block_tables.zero_()
    meta.block_tables[:, :new.block_tables.shape[1]].copy_(new.block_tables)
    q.copy_(torch.randn_like(q))
    graph.replay()
    meta.seq_lens_cpu = new.seq_lens_cpu
    torch.testing.assert_close(out.float(), reference(q, kv_cache, meta, 0.1), atol=3e-2, rtol=3e-2)


DECODE_CASES = [case for case in CASES if all(q_len == 1 for _, q_len in case[0])]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("seqs,hq,hkv,head_dim,block_size", DECODE_CASES)
def test_rotary_inside_decode_equals_rotary_then_attention(seqs, hq, hkv, head_dim, block_size, dtype, atol, rtol,
                                                           device, poisoned_workspace):
    """The decode kernel's own rotary + cache write against rotary.py's reference then attention's, on the raw
    rows of one fused qkv output; the cache it leaves must hold the same keys and values."""
    from backend.kernels.rotary import rotary_and_cache_ref
    from tests.kernels.test_rotary import cos_sin_cache

    kv_cache, meta = make_batch(seqs, hkv, head_dim, block_size, dtype, device)
    tokens = len(seqs)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=device)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], -1))
    positions = meta.seq_lens.long() - 1
    cos_sin = cos_sin_cache(8192, head_dim, device)
    scale = head_dim ** -0.5
    expected_cache = kv_cache.clone()
    q_rot, _ = rotary_and_cache_ref(q, k, v, positions, cos_sin, expected_cache, meta.slot_mapping)
    expected = reference(q_rot, expected_cache, meta, scale)

    out = pa.rotary_decode_attention_triton(q, k, v, positions, cos_sin, kv_cache, meta, scale)

    torch.testing.assert_close(kv_cache.float(), expected_cache.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


def test_rotary_inside_decode_is_for_decode_steps_over_16_bit_caches(device):
    kv_cache, meta = make_batch([(19, 19)], 2, 16, 16, torch.float16, device)
    q = torch.randn(19, 4, 16, dtype=torch.float16, device=device)
    k = v = torch.randn(19, 2, 16, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="decode steps"):
        pa.rotary_decode_attention_triton(q, k, v, torch.arange(19, device=device), torch.ones(64, 16, device=device),
                                          kv_cache, meta, 0.25)
