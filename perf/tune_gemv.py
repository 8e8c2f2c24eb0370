"""Tile choice for the batch-1 bf16 GEMV (backend/kernels/gemv.py) on each rank's shard of the Llama-3-8B
projections under tensor parallelism 1, 2 and 4, timed from HBM.

    python3 perf/tune_gemv.py --tp 1,2,4 --out $OUT/tune_gemv.json

Why: pick_tile was tuned on the full 8B shapes (TP1) on an H100; a TP2 rank's qkv has half the rows and its o and
down half of K, so the same tiles run fewer and shorter programs (perf/RESULTS.md, "Multi-GPU": TP2's halved
projections streamed 3.5 TB/s against TP1's 3.9). Each timing rotates over copies of the weight (200 MB in all) so
that it comes from HBM as in the engine (perf/tune_quant_gemv.py's from_hbm). Prints, per shape, pick_tile's time,
the best tile's, and cuBLAS's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.kernels import gemv  # noqa: E402
from perf.bench_quant import bench_ms  # noqa: E402
from perf.tune_quant_gemv import from_hbm, n_copies  # noqa: E402

TILES = [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)]
HIDDEN, INTERMEDIATE, Q, KV = 4096, 14336, 4096, 1024  # Llama-3-8B


def shard_shapes(tp: int) -> dict[str, tuple[int, int]]:
    """(N, K) of one rank's column- (qkv, gate_up) and row-parallel (o, down) shards."""
    return {"qkv": ((Q + 2 * KV) // tp, HIDDEN), "o": (HIDDEN, Q // tp),
            "gate_up": (2 * INTERMEDIATE // tp, HIDDEN), "down": (HIDDEN, INTERMEDIATE // tp)}


def tune(N: int, K: int) -> dict:
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    copies = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(n_copies(2 * N * K))]
    want = gemv.gemv_ref(x.double(), copies[0].double()).float()
    nbytes = 2 * N * K
    row = {"N": N, "K": K, "pick_tile": list(gemv.pick_tile(N, K)),
           "cublas_us": 1e3 * bench_ms(from_hbm(lambda w: F.linear(x, w), copies)), "tiles": []}
    for tile in TILES:
        err = float((gemv.gemv_triton(x, copies[0], tile).float() - want).norm() / want.norm())
        us = 1e3 * bench_ms(from_hbm(lambda w: gemv.gemv_triton(x, w, tile), copies))
        row["tiles"].append({"tile": list(tile), "us": us, "TB_s": nbytes / us / 1e6, "rel_err": err})
    row["pick_us"] = next(t["us"] for t in row["tiles"] if t["tile"] == row["pick_tile"])
    row["best"] = min(row["tiles"], key=lambda t: t["us"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", default="1,2,4")
    parser.add_argument("--out", default="tune_gemv.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "shapes": {}}
    for tp in (int(t) for t in args.tp.split(",")):
        for name, (N, K) in shard_shapes(tp).items():
            r = results["shapes"][f"tp{tp}/{name}"] = tune(N, K)
            b = r["best"]
            print(f"tp{tp} {name:8s} {N:6d} x {K:5d}  pick_tile {tuple(r['pick_tile'])} {r['pick_us']:6.1f} us  "
                  f"best {tuple(b['tile'])} {b['us']:6.1f} us ({b['TB_s']:.2f} TB/s)  cuBLAS {r['cublas_us']:6.1f} us",
                  flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
