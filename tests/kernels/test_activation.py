import pytest
import torch
import torch.nn.functional as F

from backend.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
ON_GPU = torch.cuda.is_available()

DTYPES = [(torch.bfloat16, 2e-2, 2e-2), (torch.float16, 2e-3, 2e-3)] if ON_GPU else \
    [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
SHAPES = [(1, 2 * 16), (7, 2 * 100), (13, 2 * 1536), (2, 3, 2 * 33)] + \
    ([(257, 2 * 14336), (4096, 2 * 1000)] if ON_GPU else [])


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul(shape, dtype, atol, rtol, device):
    gate_up = torch.randn(shape, dtype=dtype, device=device) * 4
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=device)

    got = silu_and_mul_triton(gate_up, out=out)

    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(got.double(), F.silu(gate) * up, atol=atol, rtol=rtol)
    torch.testing.assert_close(got, silu_and_mul_ref(gate_up), atol=atol, rtol=rtol)
