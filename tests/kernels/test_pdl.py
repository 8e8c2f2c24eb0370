"""Programmatic dependent launch (backend/kernels/_pdl.py): off where it cannot run, and on Hopper a CUDA graph of
PDL launches gives bit for bit what the same kernels give launched one after another without it.

A kernel that read its input before the kernel ahead had written it would differ here: each step below reads
what the step before wrote, over weights large enough that the kernels overlap if they can.
"""
import pytest
import torch

from backend.kernels import _pdl

ON_GPU = torch.cuda.is_available()


def test_off_without_a_hopper_gpu(device):
    args = _pdl.pdl_args(device)
    assert set(args) == {"PDL", "launch_pdl"} and args["PDL"] == args["launch_pdl"]
    if not ON_GPU or torch.cuda.get_device_capability() < (9, 0):
        assert args == {"PDL": False, "launch_pdl": False}


def _decode_chain(x, weights, norm_w, quant):
    """RMSNorm -> qkv-like GEMV -> RMSNorm -> gate_up-like GEMV -> SiLU-and-mul -> down-like GEMV, twice."""
    from backend.kernels import quant_matmul as qm
    from backend.kernels.activation import silu_and_mul_triton
    from backend.kernels.gemv import gemv_triton
    from backend.kernels.rms_norm import rms_norm_triton

    def project(h, w):
        return qm.w8a16_gemv_triton(h, *w) if quant else gemv_triton(h, w)

    residual = x
    for first, second, third in weights:
        h, residual = rms_norm_triton(x, norm_w, 1e-5, residual)
        h, residual = rms_norm_triton(project(h, first), norm_w, 1e-5, residual)
        x = project(silu_and_mul_triton(project(h, second)), third)
    return x


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability() < (9, 0), reason="PDL needs a Hopper GPU")
@pytest.mark.parametrize("quant", [False, True], ids=["bf16", "int8"])
def test_graph_with_pdl_equals_eager_without(quant):
    from backend.engine.quantization import rtn

    hidden, inter = 1024, 4096
    weights = []
    for _ in range(2):
        layer = []
        for n, k in ((hidden, hidden), (2 * inter, hidden), (hidden, inter)):
            w = torch.randn(n, k, device="cuda") * 0.05
            layer.append(rtn.quantize_int8(w) if quant else w.to(torch.bfloat16))
        weights.append(layer)
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    was_enabled = _pdl.enabled()
    try:
        _pdl.set_enabled(True)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            _decode_chain(x, weights, norm_w, quant)  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = _decode_chain(x, weights, norm_w, quant)
        outputs = []
        for _ in range(3):
            graph.replay()
            outputs.append(got.clone())
        _pdl.set_enabled(False)
        want = _decode_chain(x, weights, norm_w, quant)
    finally:
        _pdl.set_enabled(was_enabled)
    for out in outputs:
        assert torch.equal(out, want)
