"""The GPTQ solver and its coordinate-descent refinement on synthetic layers, against objectives computed here in
float64: the calibration output error must beat round-to-nearest's, and the refinement must never raise it."""
from __future__ import annotations

import pytest
import torch

from backend.engine.quantization import gptq, rtn

GROUP = 32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _layer(N=48, K=128, T=512, seed=0, device="cpu"):
    """A weight and calibration inputs whose channels are correlated and unevenly scaled, as real activations are
    (with white inputs GPTQ has nothing to exploit)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    X = torch.randn(T, K, generator=g) @ mix * torch.logspace(-1, 1, K)[torch.randperm(K, generator=g)]
    W = torch.randn(N, K, generator=g) * 0.05
    W, X = W.to(device), X.to(device)
    H = gptq.HessianAccumulator(K, device)
    H.add(X)
    return W, X, H.H


def _output_error(X, W, dequantized) -> float:
    X, E = X.double(), (W - dequantized).double()
    return float((X @ E.T).norm() / (X @ W.double().T).norm())


def _damped_objective(H, W, dequantized) -> float:
    H = H.double()
    H = H + gptq.DAMP * H.diag().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    E = (W - dequantized).double()
    return float(torch.einsum("nk,kl,nl->", E, H, E))


def _int4(W, H, sweeps):
    codes, scales, zeros = gptq.gptq_quantize_int4(W, H, GROUP, refine_sweeps=sweeps)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= rtn.INT4_MAX
    return rtn.dequantize_int4_codes(codes, scales, zeros, GROUP)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_int4_gptq_beats_round_to_nearest_on_the_calibration_output(seed, device):
    W, X, H = _layer(seed=seed, device=device)
    rtn_error = _output_error(X, W, rtn.dequantize_int4_codes(*rtn.quantize_int4(W, GROUP), GROUP))
    assert _output_error(X, W, _int4(W, H, sweeps=0)) < 0.8 * rtn_error


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_int4_refinement_lowers_the_objective(seed, device):
    W, X, H = _layer(seed=seed, device=device)
    plain, refined = _damped_objective(H, W, _int4(W, H, 0)), _damped_objective(H, W, _int4(W, H, 2))
    assert refined < 0.99 * plain
    assert _damped_objective(H, W, _int4(W, H, 4)) <= refined * (1 + 1e-5)  # more sweeps never go back up


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_refinement_lowers_the_objective(device):
    W, X, H = _layer(K=96, device=device)

    def dequantized(sweeps):
        q, scales = gptq.gptq_quantize_fp8(W, H, refine_sweeps=sweeps)
        assert q.dtype == torch.float8_e4m3fn and torch.isfinite(q.float()).all()
        return q.float() * scales[:, None]

    rtn_q, rtn_scales = rtn.quantize_fp8(W)
    rtn_error = _output_error(X, W, rtn_q.float() * rtn_scales[:, None])
    plain, refined = dequantized(0), dequantized(2)
    assert _output_error(X, W, plain) < rtn_error
    assert _damped_objective(H, W, refined) < 0.99 * _damped_objective(H, W, plain)
