"""Tile choice for the batch-1 INT4 GEMV (backend/kernels/quant_matmul.py) on the GPU, then the engine with it.

    python3 perf/tune_w4_gemv.py --out $OUT/tune_w4_gemv.json

For each Llama-3-8B projection: the bf16 GEMV (backend/kernels/gemv.py) and cuBLAS as the ceilings, and the INT4
GEMV over rows per program x warps, each with its error against a float64 dequantized product and its
streamed GB/s (packed weights + scales + zeros). Then bf16 vs int4_wo batch-1 decode (perf/bench_quant.py's
engine run) with the best tile per shape patched in, so the table that goes into w4_gemv_tile is measured.
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
from perf.bench_quant import LINEARS, bench_ms, engine_run  # noqa: E402

TILES = [dict(BLOCK_N=b, WORDS=16, num_warps=w) for b in (8, 16, 32, 64) for w in (2, 4, 8)]


def tune_shape(N: int, K: int) -> dict:
    from backend.kernels.gemv import gemv_triton

    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * 0.02
    q4, s4, z4 = rtn.quantize_int4(w, 128)
    p4 = qm.pack_int4(q4)
    want = x.double() @ qm.dequantize_int4(p4, s4, z4, 128).double().T
    wb = w.bfloat16()
    nbytes = p4.numel() + s4.numel() * s4.element_size() + z4.numel() * z4.element_size()
    out = {"cublas_bf16_us": 1e3 * bench_ms(lambda: torch.nn.functional.linear(x, wb)),
           "gemv_bf16_us": 1e3 * bench_ms(lambda: gemv_triton(x, wb)), "int4_bytes": nbytes, "tiles": []}
    for tile in TILES:
        got = qm.w4a16_gemv_triton(x, p4, s4, z4, 128, tile=tile)
        err = float((got.double() - want).norm() / want.norm())
        us = 1e3 * bench_ms(lambda: qm.w4a16_gemv_triton(x, p4, s4, z4, 128, tile=tile))
        out["tiles"].append(dict(tile, us=us, GB_s=nbytes / us / 1e3, rel_err=err))
    out["default_tile"] = qm.w4_gemv_tile(N, K, 128, x.device)
    out["best"] = min(out["tiles"], key=lambda t: t["us"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="tune_w4_gemv.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "shapes": {}}
    for name, N, K in LINEARS:
        r = results["shapes"][name] = tune_shape(N, K)
        best = r["best"]
        default = next(t for t in r["tiles"] if all(t[k] == v for k, v in r["default_tile"].items()))
        print(f"{name:8s} N={N:6d} K={K:6d}  cuBLAS bf16 {r['cublas_bf16_us']:6.1f} us  GEMV bf16 "
              f"{r['gemv_bf16_us']:6.1f} us  int4 default {default['us']:6.1f} us ({default['GB_s']:5.0f} GB/s)  "
              f"best {best['us']:6.1f} us ({best['GB_s']:5.0f} GB/s) BLOCK_N={best['BLOCK_N']} "
              f"warps={best['num_warps']}  err {best['rel_err']:.1e}")
    by_n = {(N, K): results["shapes"][name]["best"] for name, N, K in LINEARS}
    chosen = qm.w4_gemv_tile

    def tuned(N, K, group_size, device):
        best = by_n.get((N, K))
        return {k: best[k] for k in ("BLOCK_N", "WORDS", "num_warps")} if best else chosen(N, K, group_size, device)

    results["engine_default_tiles"] = {m: engine_run(m, None, (1,)) for m in ("bf16", "int4_wo")}
    qm.w4_gemv_tile = tuned
    results["engine_tuned_tiles"] = {"int4_wo": engine_run("int4_wo", None, (1,))}
    bf16 = results["engine_default_tiles"]["bf16"]["decode_b1_tok_s"]
    for label, runs in (("default", results["engine_default_tiles"]), ("tuned", results["engine_tuned_tiles"])):
        int4 = runs["int4_wo"]["decode_b1_tok_s"]
        print(f"engine batch-1 decode: bf16 {bf16:.1f} tok/s, int4_wo ({label} tiles) {int4:.1f} tok/s = "
              f"{int4 / bf16:.2f}x")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
