"""Launch plans of the FP8 / INT8 W8A8 product (backend/kernels/scaled_matmul.py) for decode batches, on the GPU.

    python3 perf/tune_scaled_mm.py --out $OUT/tune_scaled_mm.json

For each Llama-3-8B projection at M = 16 and 64 rows: cuBLAS bf16 (F.linear) as the peer, the default plan
(scaled_mm_plan), and a grid of plans (column tile, K tile, warps, pipeline stages, split-K factor), each timed
inside a CUDA graph and checked against the dequantized float64 product; prints the default against the best.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.quantization import rtn  # noqa: E402
from backend.kernels import scaled_matmul as sm  # noqa: E402
from perf.bench_quant import LINEARS, bench_ms  # noqa: E402

GRID = list(itertools.product((32, 64, 128), (128, 256), (4, 8), (3, 4), (0.5, 1, 2)))


def plans(M: int, N: int, K: int) -> list[dict]:
    base = sm.scaled_mm_plan(M, N, K, torch.device("cuda"))
    out = []
    for block_n, block_k, warps, stages, split_factor in GRID:
        n_tiles = -(-N // block_n)
        auto = max(1, min(-(-2 * 132 // n_tiles), K // block_k // 8))
        out.append(dict(base, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
                        split=max(1, round(auto * split_factor))))
    return [dict(p) for p in {json.dumps(p, sort_keys=True): p for p in out}.values()]


def tune(M: int, N: int, K: int, kind: str) -> dict:
    w = torch.randn(N, K, device="cuda") * 0.02
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    wq, ws = rtn.quantize_fp8(w) if kind == "fp8" else rtn.quantize_int8(w)
    xq, xs = sm.quantize_per_token_triton(x, kind)
    want = (xq.double() * xs.double()[:, None]) @ (wq.double() * ws.double()[:, None]).T
    wb = w.bfloat16()
    rows = []
    for plan in plans(M, N, K):
        try:
            got = sm.scaled_matmul_triton(xq, xs, wq, ws, torch.bfloat16, plan=plan)
        except Exception as exc:  # noqa: BLE001 - a plan that does not compile (shared memory) is skipped
            rows.append(dict(plan, error=type(exc).__name__))
            continue
        err = float((got.double() - want).norm() / want.norm())
        rows.append(dict(plan, us=1e3 * bench_ms(lambda p=plan: sm.scaled_matmul_triton(xq, xs, wq, ws, torch.bfloat16,
                                                                                          plan=p)), rel_err=err))
    timed = [r for r in rows if "us" in r]
    return {"cublas_bf16_us": 1e3 * bench_ms(lambda: torch.nn.functional.linear(x, wb)),
            "default_us": 1e3 * bench_ms(lambda: sm.scaled_matmul_triton(xq, xs, wq, ws, torch.bfloat16)),
            "default_plan": sm.scaled_mm_plan(M, N, K, x.device), "best": min(timed, key=lambda r: r["us"]),
            "largest_rel_err": max(r["rel_err"] for r in timed), "plans": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="tune_scaled_mm.json")
    parser.add_argument("--kind", default="fp8", choices=["fp8", "int8"])
    parser.add_argument("--rows", default="16,64")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "kind": args.kind, "shapes": {}}
    for M in (int(m) for m in args.rows.split(",")):
        for name, N, K in LINEARS:
            r = results["shapes"][f"{name} M={M}"] = tune(M, N, K, args.kind)
            b = r["best"]
            print(f"{name:8s} M={M:3d}  cuBLAS bf16 {r['cublas_bf16_us']:6.1f} us  default {r['default_us']:6.1f} us  best "
                  f"{b['us']:6.1f} us BLOCK_N={b['BLOCK_N']} BLOCK_K={b['BLOCK_K']} warps={b['num_warps']} "
                  f"stages={b['num_stages']} split={b['split']}  (largest err {r['largest_rel_err']:.1e})", flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
