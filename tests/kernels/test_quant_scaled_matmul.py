"""W8A8 kernels (per-token activation quantizer, INT8 / FP8 tensor-core product with scales in the epilogue)
against the dequantize-then-matmul references."""
import pytest
import torch

from backend.kernels import scaled_matmul as sm

ON_GPU = torch.cuda.is_available()
SHAPES = [(1, 96, 512), (2, 64, 2048), (16, 80, 256), (40, 72, 576), (48, 40, 4096), (130, 136, 192)]  # (48, ...): split-K at M > 16
if ON_GPU:
    SHAPES += [(1, 4096, 4096), (64, 6144, 4096), (64, 4096, 14336), (512, 4096, 4096)]
OUT_DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]
# The interpreter (triton 3.6) casts float32 -> e4m3 without carrying a rounded-up mantissa into the exponent
# (127.6 becomes 64 instead of 128); the GPU's cvt instruction is right. The fp8 quantizer is checked on GPU.
FP8_CAST_BROKEN = pytest.mark.skipif(not ON_GPU, reason="interpreter's float32 -> e4m3 cast is wrong")
QUANT_KINDS = ["int8", pytest.param("fp8", marks=FP8_CAST_BROKEN)]


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_per_token_quant(kind, device):
    x = torch.randn(37, 300, device=device) * torch.logspace(-2, 2, 37, device=device)[:, None]
    q, s = sm.quantize_per_token_triton(x, kind)
    q_ref, s_ref = sm.quantize_per_token_ref(x, kind)
    torch.testing.assert_close(s, s_ref)
    # Codes agree up to one step where rounding ties break differently (int8) or on the last fp8 bit.
    diff = (q.float() - q_ref.float()).abs() / q_ref.float().abs().clamp(min=1)
    assert diff.max() <= (1.0 if kind == "int8" else 0.125)
    assert (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("kind", sm.KINDS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_scaled_matmul(M, N, K, kind, out_dtype, device):
    x = torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device)
    xq, xs = sm.quantize_per_token_ref(x, kind)
    wq, ws = sm.quantize_per_token_ref(w, kind)  # per output channel = per row of W
    got = sm.scaled_matmul_triton(xq, xs, wq, ws, out_dtype)
    want = sm.scaled_matmul_ref(xq, xs, wq, ws, torch.float32)
    tol = 1e-2 if out_dtype == torch.bfloat16 else 2e-3
    if kind == "fp8" and got.is_cuda:  # Hopper's FP8 MMA accumulator keeps ~14 bits (see _scaled_mm_kernel):
        tol = max(tol, 2e-2)  # measured up to 1.2% at K 4096 on an H100; a wrong scale or tile is off by far more
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_w8a8_linear_close_to_float(kind, device):
    x, w = torch.randn(3, 5, 256, device=device), torch.randn(64, 256, device=device) / 16
    wq, ws = sm.quantize_per_token_ref(w, kind)
    got = sm.w8a8_linear_triton(x, wq, ws, kind)
    torch.testing.assert_close(got, sm.w8a8_linear_ref(x, wq, ws, kind), atol=2e-2, rtol=2e-2)
    rel = (got.float() - x @ w.T).norm() / (x @ w.T).norm()
    assert rel < (0.02 if kind == "int8" else 0.06)
