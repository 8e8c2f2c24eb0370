"""The INT4 batch-1 GEMV on fp16 activations: the float32 loop against the bf16x2 pairs loop with each fp16 x pair
rounded to bf16x2 in registers (quant_matmul.w4_fp16_pairs, the default since session 19), per Llama-3-8B projection.

    python3 perf/exp_w4_fp16.py --out $OUT/exp_w4_fp16.json

fp16 models take this GEMV at batch 1 (AutoAWQ checkpoints are mostly fp16). Each timing rotates over copies of
the weights so they come from HBM (perf/tune_quant_gemv.py's from_hbm); each loop's error is its output's
distance from a float64 product of the same codes over the output's norm.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.quantization import rtn  # noqa: E402
from backend.kernels import quant_matmul as qm  # noqa: E402
from perf.bench_quant import LINEARS, bench_ms  # noqa: E402
from perf.tune_quant_gemv import from_hbm, n_copies  # noqa: E402

LOOPS = {"float32 loop": False, "fp16 pairs": True}


def time_projection(N: int, K: int) -> dict:
    x = torch.randn(1, K, device="cuda").half()
    q4, s4, z4 = rtn.quantize_int4(torch.randn(N, K, device="cuda") * 0.02, 128)
    p4 = qm.pack_int4(q4)
    tensors = (qm.to_planar_int4(p4, 128), s4, z4)
    want = x.double() @ qm.dequantize_int4(p4, s4, z4, 128).double().T
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    copies = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n_copies(nbytes) - 1)]
    out, default = {}, qm.w4_fp16_pairs
    for name, fp16_pairs in LOOPS.items():
        qm.w4_fp16_pairs = fp16_pairs
        gemv = lambda t: qm.w4a16_gemv_triton(x, *t, 128)  # noqa: E731
        err = float((gemv(tensors).double() - want).norm() / want.norm())
        us = 1e3 * bench_ms(from_hbm(gemv, copies))
        out[name] = dict(us=us, GB_s=nbytes / us / 1e3, rel_err=err)
    qm.w4_fp16_pairs = default
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="exp_w4_fp16.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name()}
    for name, N, K in LINEARS:
        r = results[name] = time_projection(N, K)
        print(f"{name:8s} N={N:6d} K={K:6d}  " + "  ".join(
            f"{loop} {v['us']:6.1f} us ({v['GB_s']:5.0f} GB/s, err {v['rel_err']:.1e})" for loop, v in r.items()),
            flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
