"""Tile choice for the batch-1 quantized GEMVs (backend/kernels/quant_matmul.py) on the GPU, then the engine.

    python3 perf/tune_quant_gemv.py --bits 8,4 --out $OUT/tune_quant_gemv.json

For each Llama-3-8B projection (and for INT8 the LM head): the bf16 GEMV (backend/kernels/gemv.py) and cuBLAS as
the ceilings, and the INT8 (W8A16) or INT4 (W4A16, group 128) GEMV over its tile grid, each tile with its error
against a float64 dequantized product and its streamed GB/s (packed weights + scales [+ zeros]); INT8 also against
its split-K kernel (the path M = 2-16 takes). Every timing rotates over copies of the weights, 200 MB in all, so
they come from HBM as in the engine, not from L2. Then bf16 against each quantized mode in batch-1 decode
(perf/bench_quant.py's engine run; INT8 with its LM head quantized too), with the default tiles and with the best
tile per shape patched in, so the tile tables that go into w8_gemv_tile / w4_gemv_tile are measured.
(Session 3 ran the INT4 part of this as perf/tune_w4_gemv.py.)
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
from backend.kernels import quant_matmul as qm  # noqa: E402
from perf.bench_quant import LINEARS, bench_ms, engine_run  # noqa: E402

# W4: TILES row tiles of BLOCK_N rows over BLOCKS planar blocks (16 words each); BLOCKS * 16 < 32 * num_warps keeps the x
# loads in the words' layout (backend/kernels/quant_matmul.py). The grid holds w4_gemv_tile's choices.
W4_TILES = [dict(TILES=t, BLOCK_N=b, BLOCKS=bl, num_warps=w) for t in (2, 4, 8) for b in (2, 4, 8)
            for bl, w in ((4, 4), (4, 8), (8, 8), (8, 16), (16, 16))]
W8_TILES = [dict(BLOCK_N=b, WORDS=words, num_warps=w) for b in (4, 8, 16, 32) for words in (32, 64, 128, 256)
            for w in (4, 8)]


L2_FLUSH_BYTES = 200 << 20  # over 4x the H100's 50 MB L2: timed calls rotate over copies this large in all


def shapes(bits: int) -> list:
    """The 8B projections; for 8 bits also the LM head (--quant-lm-head puts it in INT8 under every weight-only
    method)."""
    return LINEARS + ([("lm_head", 128256, 4096)] if bits == 8 else [])


def from_hbm(fn, copies: list):
    """fn(copy) called on the next copy each time: a projection smaller than L2 (qkv and o in 4 or 8 bits) would
    otherwise be timed from L2, and tiles that win there lose in the engine, where every weight comes from HBM
    (session 5: the 4-bit tile table measured from L2 moved batch-1 decode by 1%, the one measured here by 43%)."""
    turn = itertools.cycle(copies)
    return lambda: fn(next(turn))


def n_copies(nbytes: int) -> int:
    return max(1, -(-L2_FLUSH_BYTES // nbytes))


def quantized(bits: int, w: torch.Tensor) -> tuple:
    """(gemv(x, tile, tensors), tensors, default tile, tiles, float64 dequantized weight, bytes streamed, split-K
    (x, tensors) or None) for one projection; `tensors` is the packed weight with its scales [and zeros]."""
    N, K = w.shape
    if bits == 8:
        q8, s8 = rtn.quantize_int8(w)
        return (lambda x, tile, t: qm.w8a16_gemv_triton(x, *t, tile=tile), (q8, s8), qm.w8_gemv_tile(N, K, w.device),
                W8_TILES, q8.double() * s8.double()[:, None], q8.numel() + s8.numel() * s8.element_size(),
                lambda x, t: qm._launch(qm._w8a16_kernel, x, N, K, qm.plan_launch(1, N, K, x.device),
                                        (*t, (t[0].stride(0),)), {}))
    q4, s4, z4 = rtn.quantize_int4(w, 128)
    p4 = qm.pack_int4(q4)
    nbytes = p4.numel() + s4.numel() * s4.element_size() + z4.numel() * z4.element_size()
    return (lambda x, tile, t: qm.w4a16_gemv_triton(x, *t, 128, tile=tile), (qm.to_planar_int4(p4, 128), s4, z4),
            qm.w4_gemv_tile(N, K, 128, w.device), W4_TILES, qm.dequantize_int4(p4, s4, z4, 128).double(), nbytes,
            None)


def tune_shape(bits: int, N: int, K: int) -> dict:
    from backend.kernels.gemv import gemv_triton

    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * 0.02
    gemv, tensors, default, tiles, dequantized, nbytes, split_k = quantized(bits, w)
    want = x.double() @ dequantized.T
    del dequantized
    copies = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n_copies(nbytes) - 1)]
    bf16 = [w.bfloat16()] + [w.bfloat16() for _ in range(n_copies(2 * w.numel()) - 1)]
    out = {"cublas_bf16_us": 1e3 * bench_ms(from_hbm(lambda wb: torch.nn.functional.linear(x, wb), bf16)),
           "gemv_bf16_us": 1e3 * bench_ms(from_hbm(lambda wb: gemv_triton(x, wb), bf16)), "bytes": nbytes,
           "copies": len(copies), "tiles": []}
    del bf16
    if split_k is not None:
        out["split_k_us"] = 1e3 * bench_ms(from_hbm(lambda t: split_k(x, t), copies))
    for tile in tiles:
        err = float((gemv(x, tile, tensors).double() - want).norm() / want.norm())
        us = 1e3 * bench_ms(from_hbm(lambda t: gemv(x, tile, t), copies))
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
    patches = {8: ("w8_gemv_tile", "int8_wo+head"), 4: ("w4_gemv_tile", "int4_wo")}  # +head: the LM head is tuned too
    bits_list = [int(b) for b in args.bits.split(",")]
    for bits in bits_list:
        by_name = results[f"int{bits}"] = {}
        for name, N, K in shapes(bits):
            r = by_name[name] = tune_shape(bits, N, K)
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
        by_shape = {(N, K): results[f"int{bits}"][name]["best"] for name, N, K in shapes(bits)}
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
