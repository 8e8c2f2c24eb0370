"""The shared-memory INT4 GEMV (backend/kernels/w4_gemv_ring.py) against the register kernel, per 8B projection.

    python3 perf/exp_w4_ring.py --out $OUT/exp_w4_ring.json      # GPU (Hopper)

For each Llama-3-8B projection at groups of 128 (gate_up gated, as the engine runs it): the register kernel with
float32 scales (the engine before session 22) and float16 scales, and the ring kernel with float16 scales (copies by cp.async and by
the TMA engine) at its default trips in flight and at every other count that fits, each timed from HBM (calls rotate over copies of the
weights, 200 MB in all, inside a CUDA graph: perf/tune_quant_gemv.py's method) with its error against the float64
dequantized product and its streamed GB/s (codes, scales and zero points).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.quantization import rtn  # noqa: E402
from backend.kernels.activation import silu_and_mul_ref  # noqa: E402
from backend.kernels import quant_matmul as qm  # noqa: E402
from backend.kernels import w4_gemv_ring as ring  # noqa: E402
from perf.bench_quant import bench_ms  # noqa: E402
from perf.tune_quant_gemv import from_hbm, n_copies  # noqa: E402

PROJECTIONS = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 14336, 4096, True),
               ("down", 4096, 14336, False)]


def projection(name: str, n_out: int, K: int, gated: bool) -> dict:
    N = 2 * n_out if gated else n_out
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    q, s32, z = rtn.quantize_int4(torch.randn(N, K, device="cuda") * 0.02, 128)
    packed = qm.pack_int4(q)
    words = qm.to_planar_int4(packed, 128)
    want = x.double() @ qm.dequantize_int4(packed, s32, z, 128).double().T
    want = silu_and_mul_ref(want) if gated else want
    s16 = s32.half()
    out = {"n_out": n_out, "K": K, "gated": gated, "runs": {}}
    tile = ring.ring_tile(n_out, K)
    default_stages = ring._stages(K, tile["ROWS"], tile["BLOCKS"], 2)
    trips = K // (tile["BLOCKS"] * 128)
    cases = {"register, float32 scales": (s32, lambda t: qm.w4a16_gemv_triton(x, *t, 128, gated=gated)),
             "register, float16 scales": (s16, lambda t: qm.w4a16_gemv_triton(x, *t, 128, gated=gated))}
    for stages in sorted({default_stages, 1, 2, min(trips, default_stages + 1)}):
        if stages <= trips:
            label = f"ring, {stages} of {trips} trips in flight" + (" (default)" if stages == default_stages else "")
            cases[label] = (s16, lambda t, st=stages: ring.w4a16_gemv_ring(x, *t, gated=gated,
                                                                            tile=dict(tile, STAGES=st)))
            cases[label.replace("ring", "ring by TMA")] = (
                s16, lambda t, st=stages: ring.w4a16_gemv_ring(x, *t, gated=gated, tile=dict(tile, STAGES=st, TMA=True)))
    for label, (scales, fn) in cases.items():
        tensors = (words, scales, z)
        nbytes = words.numel() * 4 + scales.numel() * scales.element_size() + z.numel()
        copies = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n_copies(nbytes) - 1)]
        got = fn(tensors)
        err = float((got.double() - want).norm() / want.norm())
        us = 1e3 * bench_ms(from_hbm(fn, copies))
        out["runs"][label] = {"us": us, "GB_s": nbytes / us / 1e3, "rel_err": err}
        print(f"{name:8s} {label:40s} {us:7.2f} us  {nbytes / us / 1e3:6.0f} GB/s  err {err:.1e}", flush=True)
        del copies
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="exp_w4_ring.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "projections": {}}
    for name, n_out, K, gated in PROJECTIONS:
        results["projections"][name] = projection(name, n_out, K, gated)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
