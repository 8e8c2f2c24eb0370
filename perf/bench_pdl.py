"""Programmatic dependent launch on the batch-1 decode chain, without the engine around it.

    python3 perf/bench_pdl.py --out $OUT/bench_pdl.json

A decoder layer's kernels at batch 1 minus attention: RMSNorm -> qkv GEMV -> o GEMV -> RMSNorm -> gate_up GEMV
-> SiLU-and-mul -> down GEMV, over LAYERS layers with weights of their own (from HBM, as in the engine), captured
in one CUDA graph. For bf16, INT8 and INT4 (group 128) weights: microseconds per layer and the weight bytes
streamed per second, with PDL off and on (backend/kernels/_pdl.py), and the largest difference of the graph's
output from an eager run without PDL (0: the kernels wait for their inputs). Prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.quantization import rtn  # noqa: E402
from backend.kernels import _pdl  # noqa: E402
from backend.kernels import quant_matmul as qm  # noqa: E402
from backend.kernels.activation import silu_and_mul_triton  # noqa: E402
from backend.kernels.gemv import gemv_triton  # noqa: E402
from backend.kernels.rms_norm import rms_norm_triton  # noqa: E402

HIDDEN, INTER, QKV = 4096, 14336, 6144
LAYERS = 8


def projection(kind: str, N: int, K: int):
    """(gemv(x), bytes streamed) for a random weight of one projection in `kind`."""
    w = torch.randn(N, K, device="cuda") * 0.02
    if kind == "bf16":
        wb = w.to(torch.bfloat16)
        return (lambda x: gemv_triton(x, wb)), wb.numel() * 2
    if kind == "int8":
        q, s = rtn.quantize_int8(w)
        return (lambda x: qm.w8a16_gemv_triton(x, q, s)), q.numel() + s.numel() * s.element_size()
    q4, s4, z4 = rtn.quantize_int4(w, 128)
    p4 = qm.pack_int4(q4)
    nbytes = p4.numel() + s4.numel() * s4.element_size() + z4.numel() * z4.element_size()
    words = qm.to_planar_int4(p4, 128)
    return (lambda x: qm.w4a16_gemv_triton(x, words, s4, z4, 128)), nbytes


def make_layers(kind: str) -> tuple[list, int]:
    layers, nbytes = [], 0
    for _ in range(LAYERS):
        layer = {}
        for name, N, K in (("qkv", QKV, HIDDEN), ("o", HIDDEN, HIDDEN), ("gate_up", 2 * INTER, HIDDEN),
                           ("down", HIDDEN, INTER)):
            layer[name], b = projection(kind, N, K)
            nbytes += b
        layers.append(layer)
    return layers, nbytes // LAYERS


def chain(layers: list, x: torch.Tensor, norm_w: torch.Tensor) -> torch.Tensor:
    residual = x
    for layer in layers:
        h, residual = rms_norm_triton(x, norm_w, 1e-5, residual)
        qkv = layer["qkv"](h)
        o = layer["o"](qkv[:, :HIDDEN])  # attention left out: its output has the shape of q
        h, residual = rms_norm_triton(o, norm_w, 1e-5, residual)
        x = layer["down"](silu_and_mul_triton(layer["gate_up"](h)))
    return x


def time_chain(layers: list, pdl: bool, replays: int = 50) -> tuple[float, float]:
    """(us per layer, max abs difference of the output from an eager run without PDL)."""
    _pdl.set_enabled(pdl)
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile this variant's kernels outside the capture
            chain(layers, x, norm_w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(layers, x, norm_w)
    graph.replay()
    torch.cuda.synchronize()
    _pdl.set_enabled(False)
    want = chain(layers, x, norm_w)
    diff = float((out.float() - want.float()).abs().max())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / replays / LAYERS, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kinds", default="bf16,int8,int4")
    parser.add_argument("--out", default="bench_pdl.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "rows": {}}
    for kind in args.kinds.split(","):
        layers, layer_bytes = make_layers(kind)
        for pdl in (False, True):
            us, diff = time_chain(layers, pdl)
            results["rows"][f"{kind} PDL {'on' if pdl else 'off'}"] = dict(
                us_per_layer=us, TBps=layer_bytes / us / 1e6, max_abs_diff=diff)
        del layers
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{results['device']}, {LAYERS} layers, us per layer (norm, qkv, o, norm, gate_up, SiLU, down)")
    for key, row in results["rows"].items():
        print(f"  {key:28s} {row['us_per_layer']:8.1f} us  {row['TBps']:5.2f} TB/s  diff {row['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
