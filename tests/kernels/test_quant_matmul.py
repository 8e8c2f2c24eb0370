"""W8A16 / W4A16 kernels against the dequantize-then-matmul references (interpreter on CPU, compiled on GPU)."""
import pytest
import torch

from backend.kernels import _pdl
from backend.kernels import quant_matmul as qm

ON_GPU = torch.cuda.is_available()
# Interpreter: fp32 and fp16 (its bf16 tl.dot is broken); GPU: bf16 and fp16. The reference is float32 math on
# the same (rounded) inputs, so the tolerance covers only the output rounding and the split-K atomic sums.
DTYPES = [(torch.bfloat16, 2e-2, 2e-2), (torch.float16, 3e-3, 3e-3)] if ON_GPU else \
    [(torch.float32, 1e-4, 1e-4), (torch.float16, 3e-3, 3e-3)]
# (M, N, K, group): decode rows (split-K), a medium batch, a prefill tile; N and M off the tile sizes; K = 576
# (SmolLM2's hidden size) is 4.5 groups of 128: the last group is short.
SHAPES = [(1, 96, 512, 128), (2, 64, 4096, 128), (3, 200, 1024, 64), (16, 64, 256, 32), (40, 72, 256, 128), (5, 40, 576, 128), (130, 136, 192, 64)]
if ON_GPU:
    SHAPES += [(1, 4096, 4096, 128), (7, 6144, 4096, 128), (64, 4096, 14336, 128), (300, 1024, 4096, 128)]


def random_int8(N, K, device):
    return torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device), torch.rand(N, device=device) / 50 + 1e-3


def random_int4(N, K, group, device):
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=device)
    groups = -(-K // group)
    scales = torch.rand(N, groups, device=device) / 10 + 1e-3
    zeros = torch.randint(0, 16, (N, groups), dtype=torch.uint8, device=device)
    return qm.pack_int4(q), scales, zeros


def test_pack_roundtrip():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    assert torch.equal(qm.unpack_int4(qm.pack_int4(q)), q)


@pytest.mark.parametrize("K,group", [(256, 128), (576, 128), (96, 96), (256, 32), (192, 64), (1536, 1536)])
def test_planar_layout(K, group):
    # Word j of block b holds at nibbles i and i + 4 (i < 4) the codes of columns b * B + i * B / 4 + 2j and the
    # next one; columns past K are code 0.
    q = torch.randint(0, 16, (3, K), dtype=torch.uint8)
    words = qm.to_planar_int4(qm.pack_int4(q), group)
    block = qm.planar_block(K, group)
    assert words.dtype == torch.int32 and words.shape == (3, -(-K // block) * block // 8)
    for column in (0, 1, 2, block // 4 + 3, K // 3 * 2, K - 1):
        b, rest = divmod(column, block)
        i, offset = divmod(rest, block // 4)
        j, second = divmod(offset, 2)
        word = int(words[1, b * block // 8 + j]) & 0xFFFFFFFF
        assert (word >> (4 * (i + 4 * second))) & 0xF == q[1, column]
    if K % block:  # the last block's columns past K
        last = words[:, -(block // 8):].to(torch.int64) & 0xFFFFFFFF
        nibbles = (last.unsqueeze(1) >> (4 * torch.arange(8).view(1, 8, 1))) & 0xF  # [row, i, j]
        assert (nibbles[:, qm.planar_columns(block) >= K % block] == 0).all()
    assert torch.equal(qm.from_planar_int4(words, K, group), qm.pack_int4(q))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("M,N,K,group", SHAPES)
def test_w8a16(M, N, K, group, dtype, atol, rtol, device):
    qweight, scales = random_int8(N, K, device)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    got = qm.w8a16_matmul_triton(x, qweight, scales)
    want = qm.w8a16_matmul_ref(x.float(), qweight, scales)
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.float(), want, atol=atol * want.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_w8a16_narrow_product_dequantizes_into_the_shared_scratch(dtype, atol, rtol, device):
    # 100 rows x 72 columns is one 128 x 128 tile of the tiled plan, under one program per SM on any device: the
    # auto path dequantizes into the scratch buffer W4A16 shares, and its product matches the reference.
    M, N, K = 100, 72, 256
    qweight, scales = random_int8(N, K, device)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    got = qm.w8a16_matmul_triton(x, qweight, scales)
    scratch = qm._DEQUANT_SCRATCH.take(N * K, dtype, x.device).view(N, K)
    assert torch.equal(scratch, qm.dequantize_int8(qweight, scales).to(dtype))  # this product's dense weight
    want = qm.w8a16_matmul_ref(x.float(), qweight, scales)
    torch.testing.assert_close(got.float(), want, atol=atol * want.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(got, qm.w8a16_matmul_triton(x, qweight, scales, path="dequant"))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_w4a16_narrow_product_dequantizes_into_the_shared_scratch(dtype, atol, rtol, device):
    # 100 rows x 72 columns: two join tiles, under one program per SM on any device, so the auto path dequantizes.
    M, N, K, group = 100, 72, 256, 128
    qweight, scales, zeros = random_int4(N, K, group, device)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    assert qm.w4_takes_dequant(M, N, K, group, x.device) and not qm.w4_takes_dequant(M, 4096 * 64, K, group, x.device)
    got = qm.w4a16_matmul_triton(x, qm.to_planar_int4(qweight, group), scales, zeros, group)
    scratch = qm._DEQUANT_SCRATCH.take(N * K, dtype, x.device).view(N, K)
    assert torch.equal(scratch, qm.dequantize_int4(qweight, scales, zeros, group).to(dtype))
    want = float64_product(x, qweight, scales, zeros, group)
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)


def int4_gemv_tolerance(dtype, atol: float, rtol: float) -> tuple[float, float]:
    """The INT4 GEMV (batch 1) rounds fp16 x to bf16 pairs (w4_fp16_pairs; the interpreter's form too, which
    then sums in float32) and on the GPU sums products in bf16x2: ~4e-3 of the output's norm there, and single
    outputs past 3e-3 on either. So fp16 gets the 16-bit activations test's 1% bound (the float32 loop it
    replaced met 3e-3)."""
    if dtype == torch.float16 and qm.w4_fp16_pairs:
        return 1e-2, 1e-2
    return atol, rtol


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("M,N,K,group", SHAPES)
def test_w4a16(M, N, K, group, dtype, atol, rtol, device):
    qweight, scales, zeros = random_int4(N, K, group, device)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    got = qm.w4a16_matmul_triton(x, qm.to_planar_int4(qweight, group), scales, zeros, group)
    want = qm.w4a16_matmul_ref(x.float(), qweight, scales, zeros, group)
    if M == 1:  # the GEMV
        atol, rtol = int4_gemv_tolerance(dtype, atol, rtol)
    torch.testing.assert_close(got.float(), want, atol=atol * want.abs().max().item(), rtol=rtol)


# Batch 1 takes the GEMV: rows off its row tile, K shorter than / not a multiple of its chunk, a last group
# shorter than the others, groups smaller than and equal to K (96: not a power of two).
GEMV_SHAPES = [(37, 576, 128), (8, 1024, 32), (130, 1536, 64), (16, 96, 96)] + \
    ([(6144, 4096, 128), (4096, 14336, 128)] if ON_GPU else [])


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("N,K,group", GEMV_SHAPES)
def test_w4a16_batch_one_gemv(N, K, group, dtype, atol, rtol, device):
    qweight, scales, zeros = random_int4(N, K, group, device)
    x = torch.randn(1, K, device=device).to(dtype) / K ** 0.5
    words = qm.to_planar_int4(qweight, group)
    got = qm.w4a16_gemv_triton(x, words, scales, zeros, group)
    want = x.double() @ qm.dequantize_int4(qweight, scales, zeros, group).double().T
    atol, rtol = int4_gemv_tolerance(dtype, atol, rtol)
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(qm.w4a16_matmul_triton(x, words, scales, zeros, group), got)  # the dispatch


# The last: the 8B default for qkv and gate_up with a register cap (compiled on the GPU only)
W4_GEMV_TILES = [dict(TILES=1, BLOCK_N=4, BLOCKS=2, num_warps=2), dict(TILES=2, BLOCK_N=16, BLOCKS=4, num_warps=4),
                 dict(TILES=4, BLOCK_N=8, BLOCKS=8, num_warps=4),
                 dict(TILES=8, BLOCK_N=2, BLOCKS=8, num_warps=8, maxnreg=48)]


@pytest.mark.parametrize("preload", [True, False])
@pytest.mark.parametrize("tile", W4_GEMV_TILES)
@pytest.mark.parametrize("N,K,group", GEMV_SHAPES)
def test_w4a16_gemv_tiles(N, K, group, tile, preload, device, monkeypatch):
    # Tiles of several blocks and row tiles: blocks past K (576 = 4.5 blocks of 128, the last one padded), blocks
    # past the last (BLOCKS does not divide their count), whole trips (1024 / 32 = 32 blocks: no K masks), blocks
    # in different groups, and group == K (every block in group 0). With the first trip loaded before the PDL
    # wait (preload) and without: a trip counted twice or skipped is off by a whole trip's products.
    monkeypatch.setattr(_pdl, "preload_first_tile", preload)
    qweight, scales, zeros = random_int4(N, K, group, device)
    x = torch.randn(1, K, device=device, dtype=torch.float32) / K ** 0.5
    got = qm.w4a16_gemv_triton(x, qm.to_planar_int4(qweight, group), scales, zeros, group, tile=tile)
    want = x.double() @ qm.dequantize_int4(qweight, scales, zeros, group).double().T
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("tile", [t for t in W4_GEMV_TILES if t["TILES"] % 2 == 0])
def test_gated_w4a16_gemv_pairs_gate_and_up_tiles(tile, device):
    # Two and four row tiles per program (one and two gate/up pairs), 37 output rows: the last program's pairs
    # run past the rows.
    N, K, group = 74, 576, 32
    q4, s4, z4 = random_int4(N, K, group, device)
    x = torch.randn(1, K, device=device, dtype=torch.float32) / K ** 0.5
    want = _silu_and_mul(x.double() @ qm.dequantize_int4(q4, s4, z4, group).double().T)
    got = qm.w4a16_gemv_triton(x, qm.to_planar_int4(q4, group), s4, z4, group, tile=tile, gated=True)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)
    with pytest.raises(ValueError, match="TILES must be even"):
        qm.w4a16_gemv_triton(x, qm.to_planar_int4(q4, group), s4, z4, group, tile=dict(tile, TILES=1), gated=True)


@pytest.mark.parametrize("dtype,pairs,chain", [(torch.bfloat16, False, 1), (torch.bfloat16, True, 1),
                                               (torch.bfloat16, True, 2), (torch.float16, True, 2)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("N,K,group", GEMV_SHAPES)
def test_w4a16_gemv_with_16_bit_activations(N, K, group, gated, dtype, pairs, chain, device, monkeypatch):
    # The INT4 GEMV loops on 16-bit activations against the float64 product. The bf16x2 loop (nibbles i and i + 4
    # of a word as one pair, facing one int32 word of x) is off by whole weights if a pair lands in the wrong half
    # or column; its products are rounded to bf16 and summed over 1 or 2 words (4 or 8 products) to a pair
    # before float32 takes over, so the tolerance is a few bf16 roundings of the largest output. fp16 x takes it
    # with each pair rounded to bf16 as it is loaded (w4_fp16_pairs): fp16 bits read as bf16, or the halves
    # swapped, are off by far more.
    monkeypatch.setattr(qm, "w4_bf16_pairs", pairs)
    monkeypatch.setattr(qm, "w4_chain_words", chain)
    monkeypatch.setattr(qm, "w4_fp16_pairs", True)
    qweight, scales, zeros = random_int4(N * (2 if gated else 1), K, group, device)
    x = (torch.randn(1, K, device=device) / K ** 0.5).to(dtype)
    want = x.double() @ qm.dequantize_int4(qweight, scales, zeros, group).double().T
    if gated:
        want = _silu_and_mul(want)
    got = qm.w4a16_gemv_triton(x, qm.to_planar_int4(qweight, group), scales, zeros, group, gated=gated)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)


# W8A16's batch-1 GEMV: rows off its row tile, K not a multiple of its 512-byte chunk (576 = 1.125 chunks,
# 1540 = 385 words), and the extremes -128 and 127.
W8_GEMV_SHAPES = [(37, 576), (8, 1024), (130, 1540), (16, 96)] + ([(6144, 4096), (4096, 14336)] if ON_GPU else [])


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("N,K", W8_GEMV_SHAPES)
def test_w8a16_batch_one_gemv(N, K, dtype, atol, rtol, device):
    qweight, scales = random_int8(N, K, device)
    qweight[0, :3] = torch.tensor([-128, 127, -1], dtype=torch.int8)
    x = torch.randn(1, K, device=device).to(dtype) / K ** 0.5
    got = qm.w8a16_gemv_triton(x, qweight, scales)
    want = x.double() @ (qweight.double() * scales.double()[:, None]).T
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(qm.w8a16_matmul_triton(x, qweight, scales), got)  # the dispatch


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("x_words,magic,eviction", [(True, False, ""), (False, True, ""), (True, True, "evict_first")])
@pytest.mark.parametrize("gated", [False, True])
def test_w8a16_gemv_loop_options_give_the_same_product(x_words, magic, eviction, gated, dtype, atol, rtol, device,
                                                        monkeypatch):
    # The INT8 GEMV's alternative loops (activations read as int64 words, bytes converted by the exponent trick,
    # evict-first weight loads) against the float64 product, with the extremes -128 and 127, a first chunk taken
    # before the PDL wait and one after it, and K off the chunk.
    monkeypatch.setattr(qm, "w8_x_words", x_words)
    monkeypatch.setattr(qm, "w8_magic", magic)
    monkeypatch.setattr(qm, "w8_weight_eviction", eviction)
    N, K = 24, 1552
    qweight, scales = random_int8(N, K, device)
    qweight[0, :4] = torch.tensor([-128, 127, -1, 0], dtype=torch.int8)
    x = torch.randn(1, K, device=device).to(dtype) / K ** 0.5
    want = x.double() @ (qweight.double() * scales.double()[:, None]).T
    if gated:
        want = _silu_and_mul(want)
    for preload in (False, True):
        monkeypatch.setattr(qm._pdl, "preload_first_tile", preload)
        got = qm.w8a16_gemv_triton(x, qweight, scales, tile=dict(BLOCK_N=4, WORDS=128, num_warps=4), gated=gated)
        torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# Gated GEMVs ([gate; up] -> silu(gate) * up): half-rows off the row tiles, K off the chunk; a g32 SmolLM2 shape.
GATED_SHAPES = [(74, 576, 128), (16, 1024, 32), (3072, 576, 32)] + ([(28672, 4096, 128)] if ON_GPU else [])


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("N,K,group", GATED_SHAPES)
def test_gated_gemvs_are_silu_and_mul_of_the_product(N, K, group, dtype, atol, rtol, device):
    x = torch.randn(1, K, device=device).to(dtype) / K ** 0.5
    q8, s8 = random_int8(N, K, device)
    want8 = _silu_and_mul(x.double() @ (q8.double() * s8.double()[:, None]).T)
    got8 = qm.w8a16_gemv_triton(x, q8, s8, gated=True)
    torch.testing.assert_close(got8.double(), want8, atol=atol * want8.abs().max().item(), rtol=rtol)
    q4, s4, z4 = random_int4(N, K, group, device)
    want4 = _silu_and_mul(x.double() @ qm.dequantize_int4(q4, s4, z4, group).double().T)
    got4 = qm.w4a16_gemv_triton(x, qm.to_planar_int4(q4, group), s4, z4, group, gated=True)
    assert got4.shape == (1, N // 2)
    atol, rtol = int4_gemv_tolerance(dtype, atol, rtol)
    torch.testing.assert_close(got4.double(), want4, atol=atol * want4.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("path", ["tiled", "dequant"])
@pytest.mark.parametrize("M,N,K", [(3, 37, 576), (70, 130, 200)])
def test_w8a16_forced_paths(path, M, N, K, dtype, atol, rtol, device):
    # Both W8A16 paths for M > 1 (the large-M one dequantizes, then F.linear), with the extremes -128 and 127.
    qweight, scales = random_int8(N, K, device)
    qweight[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    got = qm.w8a16_matmul_triton(x, qweight, scales, path=path)
    want = x.double() @ (qweight.double() * scales.double()[:, None]).T
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)


def test_w8a16_dequantize_kernel_matches_reference(device):
    qweight, scales = random_int8(37, 200, device)
    got = qm.dequantize_int8_triton(qweight, scales, torch.float32)
    torch.testing.assert_close(got, qm.dequantize_int8(qweight, scales), atol=0, rtol=0)


def test_w8a16_auto_path_by_row_count(monkeypatch, device):
    taken = []
    real = qm.dequantize_int8_triton
    monkeypatch.setattr(qm, "dequantize_int8_triton", lambda *a: taken.append("dequant") or real(*a))
    monkeypatch.setattr(qm, "W8_DEQUANT_MIN_M", 8)
    qweight, scales = random_int8(24, 64, device)
    for rows in (2, 7, 8, 9):
        qm.w8a16_matmul_triton(torch.randn(rows, 64, device=device), qweight, scales)
    assert taken == ["dequant", "dequant"]


def test_w4a16_batched_input_and_per_channel_group(device):
    # Leading batch dims are flattened; group_size == K is one group per row (AutoGPTQ's group_size -1).
    qweight, scales, zeros = random_int4(48, 96, 96, device)
    x = torch.randn(2, 3, 96, device=device)
    got = qm.w4a16_matmul_triton(x, qm.to_planar_int4(qweight, 96), scales, zeros, 96)
    want = qm.w4a16_matmul_ref(x, qweight, scales, zeros, 96)
    # on the GPU tl.dot takes fp32 inputs as TF32 (10-bit mantissa): failed at 1e-4 on an H100, as it should
    tolerance = 2e-3 if got.is_cuda else 1e-4
    torch.testing.assert_close(got, want, atol=tolerance * want.abs().max().item(), rtol=tolerance)


def test_split_k_plan_is_used_for_decode(monkeypatch):
    monkeypatch.setattr(qm, "_num_sms", lambda device: 132)
    plan = qm.plan_launch(1, 4096, 4096, torch.device("cpu"))
    assert plan["split"] > 1 and plan["BLOCK_M"] == 16
    assert qm.plan_launch(512, 4096, 4096, torch.device("cpu"))["split"] == 1
    assert qm.plan_launch(1, 64, 4096, torch.device("cpu"))["split"] == 4  # (2, 64, 4096) above splits too


def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        qm.check_group_size(256, 48)


# ---- W4A16 for M > 1: the dequantize kernel, the join kernel, the dequantize + cuBLAS path -------------------
# (N, K, group): N off every row tile; K = 576 ends in a half group; 96 = K is one group that is not a power of
# two; group 32 is smaller than the default K tile; 200 = K with a K tile (128) that overhangs the row.
DEQUANT_SHAPES = [(37, 576, 128), (130, 96, 96), (64, 1024, 32), (5, 200, 200), (72, 320, 64)]
# bf16 on the GPU only: the interpreter converts fp32 -> bf16 by truncation (1.0229 -> 1.0156), not rounding
DEQUANT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DEQUANT_DTYPES)
@pytest.mark.parametrize("N,K,group", DEQUANT_SHAPES)
def test_dequantize_int4_triton_is_exact(N, K, group, dtype, device):
    # Both sides compute (q - z) * s in float32 and round once, so they must agree bit for bit.
    qweight, scales, zeros = random_int4(N, K, group, device)
    got = qm.dequantize_int4_triton(qm.to_planar_int4(qweight, group), scales, zeros, group, K, dtype)
    assert got.dtype == dtype and got.shape == (N, K)
    assert torch.equal(got, qm.dequantize_int4(qweight, scales, zeros, group).to(dtype))


def test_dequantize_int4_triton_into_a_strided_view(device):
    # The scratch path writes into a view: rows of a wider buffer stay untouched past K.
    qweight, scales, zeros = random_int4(24, 256, 64, device)
    buffer = torch.full((24, 300), 7.0, device=device)
    qm.dequantize_int4_triton(qm.to_planar_int4(qweight, 64), scales, zeros, 64, 256, torch.float32,
                              out=buffer[:, :256])
    assert torch.equal(buffer[:, :256], qm.dequantize_int4(qweight, scales, zeros, 64))
    assert bool((buffer[:, 256:] == 7.0).all())


def float64_product(x, qweight, scales, zeros, group):
    return x.double() @ qm.dequantize_int4(qweight, scales, zeros, group).double().T


# (M, N, K, group): one row tile with split-K, rows off the tile, a last short group, group == K, a row count past
# one 64-row tile, and (on the GPU) a Llama-sized product.
PATH_SHAPES = [(2, 64, 1024, 128), (3, 200, 576, 128), (16, 40, 96, 96), (70, 136, 256, 32), (9, 72, 200, 200)]
if ON_GPU:
    PATH_SHAPES += [(48, 6144, 4096, 128), (200, 4096, 14336, 128)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("M,N,K,group", PATH_SHAPES)
@pytest.mark.parametrize("path", ["join", "dequant"])
def test_w4a16_forced_path(path, M, N, K, group, dtype, atol, rtol, device):
    qweight, scales, zeros = random_int4(N, K, group, device)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    got = qm.w4a16_matmul_triton(x, qm.to_planar_int4(qweight, group), scales, zeros, group, path=path)
    want = float64_product(x, qweight, scales, zeros, group)
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)


# Join-kernel plans off the default: wide column tiles, narrow ones, splits that leave the last program a
# partial K range.
JOIN_PLANS = [dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, split=3, GROUP_M=8, num_warps=4, num_stages=3),
              dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, split=1, GROUP_M=8, num_warps=4, num_stages=4),
              dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, split=5, GROUP_M=1, num_warps=4, num_stages=4)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("plan", JOIN_PLANS)
def test_w4a16_join_plans(plan, dtype, atol, rtol, device):
    M, N, K, group = 21, 150, 736, 128  # K = 5.75 groups; split 3 of 64-wide tiles: 256 + 256 + 224 columns
    qweight, scales, zeros = random_int4(N, K, group, device)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    got = qm.w4a16_matmul_triton(x, qm.to_planar_int4(qweight, group), scales, zeros, group, path="join", plan=plan)
    want = float64_product(x, qweight, scales, zeros, group)
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("group", [128, 32])  # nibble planes, and the word-major tile of small groups
@pytest.mark.parametrize("block_m,block_n,split", [(16, 64, 3), (32, 128, 1)])
def test_w4a16_join_with_swapped_operands(group, block_m, block_n, split, dtype, atol, rtol, device):
    # SWAP_AB accumulates W x^T: rows past M and N, and split-K partial sums, must land transposed back in place.
    M, N, K = 21, 150, 736
    qweight, scales, zeros = random_int4(N, K, group, device)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    plan = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=qm.planar_block(K, group), split=split, GROUP_M=8,
                num_warps=4, num_stages=3, SWAP_AB=True)
    got = qm.w4a16_matmul_triton(x, qm.to_planar_int4(qweight, group), scales, zeros, group, path="join", plan=plan)
    want = float64_product(x, qweight, scales, zeros, group)
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)


def test_plan_whose_k_tile_straddles_groups_is_refused(device):
    qweight, scales, zeros = random_int4(16, 256, 32, device)
    with pytest.raises(ValueError, match="BLOCK_K"):
        qm.w4a16_matmul_triton(torch.randn(4, 256, device=device), qm.to_planar_int4(qweight, 32), scales, zeros,
                               32, path="join", plan=JOIN_PLANS[0])


def test_auto_path_by_row_count(monkeypatch, device):
    # (with one SM, no join grid is narrow: narrow products are the test above)
    monkeypatch.setattr(qm, "_num_sms", lambda device: 1)
    taken = []
    monkeypatch.setattr(qm, "_w4a16_dequant_matmul", lambda *a: taken.append("dequant"))  # returns None: falls back
    real_tiled = qm._w4a16_tiled
    monkeypatch.setattr(qm, "_w4a16_tiled", lambda *a: taken.append("join") or real_tiled(*a))
    qweight, scales, zeros = random_int4(32, 128, 128, device)
    words = qm.to_planar_int4(qweight, 128)
    for rows in (2, qm.DEQUANT_MIN_M - 1, qm.DEQUANT_MIN_M):
        qm.w4a16_matmul_triton(torch.randn(rows, 128, device=device), words, scales, zeros, 128)
    assert taken == ["join", "join", "dequant", "join"]


def test_w4_join_plan_buckets(monkeypatch):
    monkeypatch.setattr(qm, "_num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert qm.w4_join_plan(2, 4096, 4096, 128, cpu)["split"] > 1  # decode: 64 column tiles alone idle half the SMs
    assert qm.w4_join_plan(2, 4096, 4096, 128, cpu)["BLOCK_M"] == 16
    assert qm.w4_join_plan(64, 4096, 4096, 128, cpu)["BLOCK_M"] == 64
    assert qm.w4_join_plan(100, 4096, 4096, 128, cpu)["split"] == 1
    assert qm.w4_join_plan(500, 4096, 4096, 128, cpu) == qm.w4_join_plan(100, 4096, 4096, 128, cpu)
    assert qm.w4_join_plan(2, 4096, 4096, 32, cpu)["BLOCK_K"] == 32  # a K tile never straddles two groups


@pytest.fixture
def scratch(monkeypatch):
    """A fresh scratch cache, and a switch that makes the code believe a CUDA graph is being captured."""
    fresh = qm._DequantScratch()
    monkeypatch.setattr(qm, "_DEQUANT_SCRATCH", fresh)
    capture = {"on": False}
    monkeypatch.setattr(qm, "_capturing", lambda device: capture["on"])
    return fresh, capture


def test_dequant_scratch_is_reused_and_grown(scratch, device):
    cache, _ = scratch
    first = cache.take(1000, torch.float16, device)
    assert cache.take(600, torch.float16, device).data_ptr() == first.data_ptr()  # smaller: same memory
    assert cache.take(1000, torch.float32, device).data_ptr() != first.data_ptr()  # one buffer per dtype
    grown = cache.take(5000, torch.float16, device)
    assert grown.numel() == 5000 and cache.nbytes() == 5000 * 2 + 1000 * 4  # the old fp16 buffer is gone


def test_dequant_scratch_never_allocates_during_capture(scratch, device):
    cache, capture = scratch
    capture["on"] = True
    assert cache.take(100, torch.float16, device) is None and cache.nbytes() == 0
    capture["on"] = False
    used_in_graph = cache.take(100, torch.float16, device)
    capture["on"] = True
    assert cache.take(100, torch.float16, device).data_ptr() == used_in_graph.data_ptr()
    assert cache.take(200, torch.float16, device) is None  # too small, and no allocation inside a capture
    capture["on"] = False
    cache.take(200, torch.float16, device)  # grows: the graph's buffer must outlive the swap
    assert any(kept.data_ptr() == used_in_graph.data_ptr() for kept in cache._kept_for_graphs)
    assert cache.nbytes() == (100 + 200) * 2


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_large_m_inside_capture_falls_back_to_the_tiled_kernel(scratch, dtype, atol, rtol, device):
    cache, capture = scratch
    M, N, K, group = qm.DEQUANT_MIN_M + 3, 48, 192, 64
    qweight, scales, zeros = random_int4(N, K, group, device)
    words = qm.to_planar_int4(qweight, group)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    want = float64_product(x, qweight, scales, zeros, group)
    capture["on"] = True
    got = qm.w4a16_matmul_triton(x, words, scales, zeros, group)
    assert cache.nbytes() == 0  # nothing allocated: the tiled kernel ran
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)
    capture["on"] = False
    qm.w4a16_matmul_triton(x, words, scales, zeros, group)  # eager (warm-up): the scratch appears
    capture["on"] = True
    got = qm.w4a16_matmul_triton(x, words, scales, zeros, group)
    assert cache.nbytes() == N * K * x.element_size()
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)


def test_int4_layer_repacks_its_weight_once_for_the_kernels(device):
    # The layer loads packed pairs (the checkpoint's layout); its first Triton forward repacks them in place into
    # group-planar words, and the product stays the reference's.
    from backend.engine.quantization.layers import Int4WeightOnlyLinear

    layer = Int4WeightOnlyLinear(576, 40, use_triton=True, device=device, group_size=128)
    reference = Int4WeightOnlyLinear(576, 40, use_triton=False, device=device, group_size=128)
    weight = torch.randn(40, 576, device=device) / 24
    layer.set_float_weight(weight)
    reference.set_float_weight(weight)
    x = torch.randn(3, 576, device=device) / 24
    want = reference(x)
    tol = 5e-3 if ON_GPU else 1e-4  # the GPU's float32 tl.dot multiplies in TF32
    for rows in (x, x[:1]):  # the join kernel, then the GEMV, on the same repacked words
        torch.testing.assert_close(layer(rows), want[:rows.shape[0]], atol=tol * want.abs().max().item(), rtol=tol)
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (40, 5 * 16)
    assert torch.equal(qm.from_planar_int4(layer.qweight, 576, 128), reference.qweight)


# The shared-memory INT4 GEMV (backend/kernels/w4_gemv_ring.py; Gluon, which has no interpreter: GPU only), its
# copies by cp.async and by the TMA engine. The 8B projections (o and down: 16 blocks a trip, qkv and gate_up: 8),
# and 32 rows over 3 trips of 16 blocks with 1, 2 and all 3 trips in flight (a refilled slot read before its copy
# lands, or a trip taken from the wrong slot, is off by whole trips); gated, float16 and float32 scales.
RING_SHAPES = [(6144, 4096, False), (4096, 4096, False), (14336, 4096, True), (4096, 14336, False),
               (32, 6144, False), (32, 6144, True)]
ON_HOPPER = ON_GPU and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("stages", [None, 1, 2])
@pytest.mark.parametrize("n_out,K,gated", RING_SHAPES)
def test_w4a16_gemv_ring(n_out, K, gated, stages, scale_dtype, tma, device, monkeypatch):
    from backend.kernels import w4_gemv_ring as ring

    qweight, scales, zeros = random_int4(n_out * (2 if gated else 1), K, 128, device)
    scales = scales.to(scale_dtype)
    x = (torch.randn(1, K, device=device) / K ** 0.5).bfloat16()
    words = qm.to_planar_int4(qweight, 128)
    tile = dict(ring.ring_tile(n_out, K), STAGES=stages, TMA=tma)
    assert ring.takes(x, words.shape[0], K, 128, gated, tile)
    got = ring.w4a16_gemv_ring(x, words, scales, zeros, gated=gated, tile=tile)
    want = x.double() @ qm.dequantize_int4(qweight, scales, zeros, 128).double().T
    if gated:
        want = _silu_and_mul(want)
    assert got.shape == (1, n_out) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)
    # the register kernel's bf16x2 sums are the same; only the float32 sums' order differs
    register = qm.w4a16_gemv_triton(x, words, scales, zeros, 128, gated=gated)
    torch.testing.assert_close(got.float(), register.float(), atol=2e-3 * want.abs().max().item(), rtol=1e-2)
    if stages is None:  # the dispatch, with the switch on
        monkeypatch.setattr(qm, "w4_gemv_ring", True)
        monkeypatch.setattr(ring, "use_tma", tma)
        torch.testing.assert_close(qm.w4a16_gemv_triton(x, words, scales, zeros, 128, gated=gated), got)


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on Hopper GPUs only")
def test_w4a16_gemv_ring_leaves_other_shapes_to_the_register_kernel(device):
    from backend.kernels import w4_gemv_ring as ring

    x = torch.randn(1, 4096, device=device).bfloat16()
    assert ring.takes(x, 4096, 4096, 128, False)
    assert not ring.takes(x, 4096, 4096, 64, False)  # groups of 64: two planar blocks a group
    assert not ring.takes(x.half(), 4096, 4096, 128, False)  # fp16 x: the register kernel rounds it to bf16 pairs
    assert not ring.takes(x, 4100, 4096, 128, False)  # rows that do not fill the last program
    assert not ring.takes(x[:, :576], 4096, 576, 128, False)  # K not whole trips
