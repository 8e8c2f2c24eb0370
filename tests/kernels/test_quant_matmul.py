"""W8A16 / W4A16 kernels against the dequantize-then-matmul references (interpreter on CPU, compiled on GPU)."""
import pytest
import torch

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
@pytest.mark.parametrize("M,N,K,group", SHAPES)
def test_w4a16(M, N, K, group, dtype, atol, rtol, device):
    qweight, scales, zeros = random_int4(N, K, group, device)
    x = torch.randn(M, K, device=device).to(dtype) / K ** 0.5
    got = qm.w4a16_matmul_triton(x, qweight, scales, zeros, group)
    want = qm.w4a16_matmul_ref(x.float(), qweight, scales, zeros, group)
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
    got = qm.w4a16_gemv_triton(x, qweight, scales, zeros, group)
    want = x.double() @ qm.dequantize_int4(qweight, scales, zeros, group).double().T
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(qm.w4a16_matmul_triton(x, qweight, scales, zeros, group), got)  # the dispatch


@pytest.mark.parametrize("slices", [2, 4])
@pytest.mark.parametrize("N,K,group", GEMV_SHAPES)
def test_w4a16_gemv_several_groups_per_chunk(N, K, group, slices, device):
    # Chunks of several slices: slices past K (576 = 4.5 slices of 128), a chunk spanning groups whose scales
    # and zero points differ per slice, and group == K (every slice reads group 0).
    qweight, scales, zeros = random_int4(N, K, group, device)
    x = torch.randn(1, K, device=device, dtype=torch.float32) / K ** 0.5
    tile = dict(qm.w4_gemv_tile(N, K, group, x.device), SLICES=slices)
    got = qm.w4a16_gemv_triton(x, qweight, scales, zeros, group, tile=tile)
    want = x.double() @ qm.dequantize_int4(qweight, scales, zeros, group).double().T
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


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


def test_w4a16_batched_input_and_per_channel_group(device):
    # Leading batch dims are flattened; group_size == K is one group per row (AutoGPTQ's group_size -1).
    qweight, scales, zeros = random_int4(48, 96, 96, device)
    x = torch.randn(2, 3, 96, device=device)
    got = qm.w4a16_matmul_triton(x, qweight, scales, zeros, 96)
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
