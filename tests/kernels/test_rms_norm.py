import pytest
import torch

from backend.kernels.rms_norm import rms_norm_ref, rms_norm_triton
ON_GPU = torch.cuda.is_available()

# (dtype, atol, rtol) against a float64 reference; one bf16/fp16 ulp of the output is the floor.
DTYPES = [(torch.bfloat16, 2e-2, 2e-2), (torch.float16, 2e-3, 2e-3)] if ON_GPU else \
    [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
SHAPES = [(1, 64), (7, 100), (33, 576), (5, 3, 1000)] + ([(257, 4096), (3, 8192)] if ON_GPU else [])


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(shape, dtype, atol, rtol, with_residual, device):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.rand(shape[-1], dtype=dtype, device=device) + 0.5
    out = torch.full_like(x, float("nan"))

    normed, summed = rms_norm_triton(x, weight, 1e-6, residual, out=out)

    # The sum is rounded to dtype in both paths (it is a layer output), so compare it exactly and build
    # the float64 reference from that rounded sum.
    ref_normed, ref_sum = rms_norm_ref(x, weight, 1e-6, residual)
    assert torch.equal(summed, ref_sum)
    ref64, _ = rms_norm_ref(ref_sum.double(), weight.double(), 1e-6)
    assert normed.data_ptr() == out.data_ptr()
    torch.testing.assert_close(normed.double(), ref64, atol=atol, rtol=rtol)


def test_rms_norm_strided_rows(device):
    base = torch.randn(9, 300, device=device)
    x = base[:, :200]  # rows with a stride larger than the hidden size
    weight = torch.randn(200, device=device)
    normed, _ = rms_norm_triton(x, weight, 1e-5)
    torch.testing.assert_close(normed, rms_norm_ref(x, weight, 1e-5)[0], atol=1e-5, rtol=1e-5)
