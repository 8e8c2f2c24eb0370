"""Tile choice for the batch-1 quantized GEMVs (backend/kernels/quant_matmul.py) on the GPU, then the engine.

    python3 perf/tune_quant_gemv.py --bits 8,4 --out $OUT/tune_quant_gemv.json

For each Llama-3-8B projection: the bf16 GEMV (backend/kernels/gemv.py) and cuBLAS as the ceilings, and the
INT8 (W8A16) or INT4 (W4A16, group 128) GEMV over its tile grid, each tile with its error against a float64
dequantized product and its streamed GB/s (packed weights + scales [+ zeros]); INT8 also against its split-K
kernel (the path M = 2-16 takes). Then bf16 against each quantized mode in batch-1 decode (perf/bench_quant.py's
engine run), with the default tiles and with the best tile per shape patched in, so the tile tables that go
into w8_gemv_tile / w4_gemv_tile are measured.
(Session 3 ran the INT4 part of this as perf/tune_w4_gemv.py.)
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

# W4: SLICES groups of 16 words (128 columns) per row in flight per chunk.
W4_TILES = [dict(BLOCK_N=b, WORDS=16, SLICES=sl, num_warps=w) for b in (8, 16, 32, 64) for sl in (1, 2, 4, 8)
            for w in (2, 4, 8) if b * sl <= 128]
W8_TILES = [dict(BLOCK_N=b, WORDS=words, num_warps=w) for b in (4, 8, 16, 32) for words in (32, 64, 128, 256)
            for w in (4, 8)]


def quantized(bits: int, w: torch.Tensor) -> tuple:
    """(gemv(x, tile), default tile, tiles, float64 dequantized weight, bytes streamed) for one projection."""
    N, K = w.shape
    if bits == 8:
        q8, s8 = rtn.quantize_int8(w)
        return (lambda x, tile: qm.w8a16_gemv_triton(x, q8, s8, tile=tile), qm.w8_gemv_tile(N, K, w.device), W8_TILES,
                q8.double() * s8.double()[:, None], q8.numel() + s8.numel() * s8.element_size(),
                lambda x: qm._launch(qm._w8a16_kernel, x, N, K, qm.plan_launch(1, N, K, x.device),
                                     (q8, s8, (q8.stride(0),)), {}))
    q4, s4, z4 = rtn.quantize_int4(w, 128)
    p4 = qm.pack_int4(q4)
    nbytes = p4.numel() + s4.numel() * s4.element_size() + z4.numel() * z4.element_size()
    return (lambda x, tile: qm.w4a16_gemv_triton(x, p4, s4, z4, 128, tile=tile), qm.w4_gemv_tile(N, K, 128, w.device),
            W4_TILES, qm.dequantize_int4(p4, s4, z4, 128).double(), nbytes, None)


def tune_shape(bits: int, N: int, K: int) -> dict:
    from backend.kernels.gemv import gemv_triton

    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * 0.02
    gemv, default, tiles, dequantized, nbytes, split_k = quantized(bits, w)
    want = x.double() @ dequantized.T
    wb = w.bfloat16()
    out = {"cublas_bf16_us": 1e3 * bench_ms(lambda: torch.nn.functional.linear(x, wb)),
           "gemv_bf16_us": 1e3 * bench_ms(lambda: gemv_triton(x, wb)), "bytes": nbytes, "tiles": []}
    if split_k is not None:
        out["split_k_us"] = 1e3 * bench_ms(lambda: split_k(x))
    for tile in tiles:
        err = float((gemv(x, tile).double() - want).norm() / want.norm())
        us = 1e3 * bench_ms(lambda: gemv(x, tile))
        out["tiles"].append(dict(tile, us=us, GB_s=nbytes / us / 1e3, rel_err=err))
    out["default_tile"] = default
    out["default"] = next(t for t in out["tiles"] if all(t[k] == v for k, v in default.items()))
    out["best"] = min(out["tiles"], key=lambda t: t["us"])
    return out


METRICS = ("us", "GB_s", "rel_err")


def best_tile_per_shape(chosen, by_shape: dict):
    """A stand-in for w8_gemv_tile / w4_gemv_tile that returns the measured best tile of a tuned shape."""
    def tile(N: int, K: int, *rest) -> dict:
        best = by_shape.get((N, K))
        return {k: v for k, v in best.items() if k not in METRICS} if best else chosen(N, K, *rest)
    return tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", default="8,4", help="comma-separated: 8 (W8A16), 4 (W4A16)")
    parser.add_argument("--out", default="tune_quant_gemv.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name()}
    patches = {8: ("w8_gemv_tile", "int8_wo"), 4: ("w4_gemv_tile", "int4_wo")}
    bits_list = [int(b) for b in args.bits.split(",")]
    for bits in bits_list:
        shapes = results[f"int{bits}"] = {}
        for name, N, K in LINEARS:
            r = shapes[name] = tune_shape(bits, N, K)
            best, default = r["best"], r["default"]
            split = f"  split-K {r['split_k_us']:6.1f} us" if "split_k_us" in r else ""
            print(f"int{bits} {name:8s} N={N:6d} K={K:6d}  cuBLAS bf16 {r['cublas_bf16_us']:6.1f} us  GEMV bf16 "
                  f"{r['gemv_bf16_us']:6.1f} us{split}  default {default['us']:6.1f} us ({default['GB_s']:5.0f} GB/s)  "
                  f"best {best['us']:6.1f} us ({best['GB_s']:5.0f} GB/s) "
                  f"{ {k: v for k, v in best.items() if k not in METRICS} }  err {best['rel_err']:.1e}",
                  flush=True)
    engine = results["engine"] = {"bf16": engine_run("bf16", None, (1,))}
    for bits in bits_list:
        attr, method = patches[bits]
        chosen = getattr(qm, attr)
        by_shape = {(N, K): results[f"int{bits}"][name]["best"] for name, N, K in LINEARS}
        engine[f"{method} default tiles"] = engine_run(method, None, (1,))
        setattr(qm, attr, best_tile_per_shape(chosen, by_shape))
        engine[f"{method} tuned tiles"] = engine_run(method, None, (1,))
        setattr(qm, attr, chosen)
    base = engine["bf16"]["decode_b1_tok_s"]
    for key, run in engine.items():
        print(f"engine batch-1 decode {key:24s} {run['decode_b1_tok_s']:7.1f} tok/s = {run['decode_b1_tok_s'] / base:.2f}x bf16")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
