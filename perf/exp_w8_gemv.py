"""Experiment: variants of the batch-1 INT8 GEMV (quant_matmul._w8a16_gemv_kernel), timed from HBM against it.

    python3 perf/exp_w8_gemv.py --out $OUT/exp_w8_gemv.json          # on the GPU machine

Variants (a copy of the kernel with switches; PDL off in all, as in a standalone launch):
  evict_first  the weight loads marked evict-first in L2 (the weights are read once per step; x and the
               scales stay)
  cg           the weight loads bypass L1 (ld.global.cg): nothing of a weight row is read twice
  pipeline     the next chunk's weights loaded before this chunk's products (a register double buffer)
  persistent   a grid of at most PROGRAMS_PER_SM programs per SM, each walking row tiles pid, pid + grid, ...
               (fewer block launches, an even tail)
  words512     2 KB of each row per chunk instead of the tile's 1 KB
"copy" is the loop unchanged, the baseline of the variants (the product kernel, timed too as "default", launches
with PDL, which overlaps back-to-back launches). Also the bf16 GEMV (backend/kernels/gemv.py) on the same weights
and a copy of it with the same double buffer. Every variant is checked against a float64 product.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.quantization import rtn  # noqa: E402
from backend.kernels import quant_matmul as qm  # noqa: E402
from perf.bench_quant import bench_ms  # noqa: E402
from perf.tune_quant_gemv import from_hbm, n_copies  # noqa: E402

PRODUCTS = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 28672, 4096, True),
            ("down", 4096, 14336, False), ("lm_head", 128256, 4096, False)]


@triton.jit
def _load_chunk(w_rows, word, row_ok, num_words, EVICT: tl.constexpr, CG: tl.constexpr):
    mask = row_ok[:, None] & (word < num_words)[None, :]
    if CG:
        return tl.load(w_rows + word[None, :], mask=mask, other=0, cache_modifier=".cg")
    if EVICT:
        return tl.load(w_rows + word[None, :], mask=mask, other=0, eviction_policy="evict_first")
    return tl.load(w_rows + word[None, :], mask=mask, other=0)


@triton.jit
def _accumulate(acc, packed, x_ptr, word, num_words):
    for i in tl.static_range(4):
        x_i = tl.load(x_ptr + 4 * word + i, mask=word < num_words, other=0.0).to(tl.float32)
        acc += ((packed << (24 - 8 * i)) >> 24).to(tl.float32) * x_i[None, :]
    return acc


@triton.jit
def _w8_variant_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, sw_n, num_tiles,
                       BLOCK_N: tl.constexpr, WORDS: tl.constexpr, GATED: tl.constexpr, EVICT: tl.constexpr,
                       CG: tl.constexpr, PERSISTENT: tl.constexpr, PIPELINE: tl.constexpr):
    r = tl.arange(0, BLOCK_N)
    words = tl.arange(0, WORDS)
    num_words = K // 4
    step = tl.num_programs(0) if PERSISTENT else num_tiles
    for tile in range(tl.program_id(0), num_tiles, step):
        if GATED:
            out_rows = tile * (BLOCK_N // 2) + r // 2
            rows = out_rows + (r % 2) * N
        else:
            out_rows = tile * BLOCK_N + r
            rows = out_rows
        row_ok = out_rows < N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * sw_n
        s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        if PIPELINE:  # the next chunk's weights are loaded before this chunk's products (registers, two deep)
            packed = _load_chunk(w_rows, words, row_ok, num_words, EVICT, CG)
            for k0 in range(WORDS, num_words, WORDS):
                upcoming = _load_chunk(w_rows, k0 + words, row_ok, num_words, EVICT, CG)
                acc = _accumulate(acc, packed, x_ptr, k0 - WORDS + words, num_words)
                packed = upcoming
            acc = _accumulate(acc, packed, x_ptr, (num_words - 1) // WORDS * WORDS + words, num_words)
        else:
            for k0 in range(0, num_words, WORDS):
                packed = _load_chunk(w_rows, k0 + words, row_ok, num_words, EVICT, CG)
                acc = _accumulate(acc, packed, x_ptr, k0 + words, num_words)
        y = tl.sum(acc, axis=1) * s
        if GATED:
            gate, up = tl.split(tl.reshape(y, [BLOCK_N // 2, 2]))
            y = gate * tl.sigmoid(gate) * up
            out_rows = tile * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + out_rows, y.to(out_ptr.dtype.element_ty), mask=out_rows < N)


@triton.jit
def _bf16_pipelined_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GATED: tl.constexpr):
    # gemv.py's kernel (EVEN_K, no PDL) with the same register double buffer as the INT8 variant
    r = tl.arange(0, BLOCK_N)
    if GATED:
        out_rows = tl.program_id(0) * (BLOCK_N // 2) + r // 2
        rows = out_rows + (r % 2) * N
    else:
        out_rows = tl.program_id(0) * BLOCK_N + r
        rows = out_rows
    cols = tl.arange(0, BLOCK_K)
    row_ok = out_rows < N
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    w = tl.load(w_ptrs, mask=row_ok[:, None], other=0.0)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        upcoming = tl.load(w_ptrs + k0, mask=row_ok[:, None], other=0.0)
        acc += w.to(tl.float32) * tl.load(x_ptr + k0 - BLOCK_K + cols).to(tl.float32)[None, :]
        w = upcoming
    acc += w.to(tl.float32) * tl.load(x_ptr + K - BLOCK_K + cols).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if GATED:
        gate, up = tl.split(tl.reshape(y, [BLOCK_N // 2, 2]))
        y = gate * tl.sigmoid(gate) * up
        out_rows = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(out_ptr + out_rows, y.to(out_ptr.dtype.element_ty), mask=out_rows < N)


def bf16_pipelined(x, wb, gated: bool):
    from backend.kernels.gemv import _large_hbm, pick_tile

    N, K = wb.shape
    block_n, block_k, warps = pick_tile(N, K, gated, gated and _large_hbm(x.device.index))
    n_out = N // 2 if gated else N
    out = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    _bf16_pipelined_kernel[(triton.cdiv(n_out, block_n // 2 if gated else block_n),)](
        x, wb, out, n_out, K, wb.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, GATED=gated, num_warps=warps)
    return out


def variant(x, q8, s8, gated: bool, tile: dict, evict=False, cg=False, programs_per_sm=0, pipeline=False,
            chunk_words=0):
    N, K = q8.shape
    n_out = N // 2 if gated else N
    per_tile = tile["BLOCK_N"] // 2 if gated else tile["BLOCK_N"]
    num_tiles = triton.cdiv(n_out, per_tile)
    grid = min(num_tiles, programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count) \
        if programs_per_sm else num_tiles
    out = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    words = q8.view(torch.int32)
    _w8_variant_kernel[(grid,)](x, words, s8, out, n_out, K, words.stride(0), num_tiles, BLOCK_N=tile["BLOCK_N"],
                                WORDS=chunk_words or tile["WORDS"], GATED=gated, EVICT=evict, CG=cg,
                                PERSISTENT=bool(programs_per_sm), PIPELINE=pipeline, num_warps=tile["num_warps"])
    return out


VARIANTS = {"copy": {}, "evict_first": dict(evict=True), "cg": dict(cg=True),
            **{f"persistent{p}": dict(programs_per_sm=p) for p in (4, 8, 16)},
            **{f"persistent{p}+evict": dict(programs_per_sm=p, evict=True) for p in (8, 16)},
            "pipeline": dict(pipeline=True), "pipeline+words128": dict(pipeline=True, chunk_words=128),
            "pipeline+persistent8": dict(pipeline=True, programs_per_sm=8), "words512": dict(chunk_words=512)}


def main() -> None:
    from backend.kernels.gemv import gemv_triton

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="exp_w8_gemv.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "products": {}}
    for name, N, K, gated in PRODUCTS:
        w = torch.randn(N, K, device="cuda") * 0.02
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        q8, s8 = rtn.quantize_int8(w)
        wb = (q8.float() * s8.float()[:, None]).bfloat16()  # the same weights in bf16
        del w
        dequantized = q8.double() * s8.double()[:, None]
        want = x.double() @ dequantized.T
        if gated:
            gate, up = want.view(-1, 2, N // 2)[:, 0], want.view(-1, 2, N // 2)[:, 1]
            want = torch.nn.functional.silu(gate) * up
        del dequantized
        copies = [(q8, s8)] + [(q8.clone(), s8.clone()) for _ in range(n_copies(q8.numel()) - 1)]
        tile = qm.w8_gemv_tile(N, K, x.device)
        row = results["products"][name] = {"tile": tile, "bytes": q8.numel() + 4 * s8.numel()}
        base = lambda t: qm.w8a16_gemv_triton(x, *t, gated=gated)  # noqa: E731
        row["default_us"] = 1e3 * bench_ms(from_hbm(base, copies))
        for label, kw in VARIANTS.items():
            got = variant(x, q8, s8, gated, tile, **kw)
            err = float((got.double() - want).norm() / want.norm())
            us = 1e3 * bench_ms(from_hbm(lambda t: variant(x, *t, gated, tile, **kw), copies))
            row[label] = {"us": us, "rel_err": err}
        row["default_again_us"] = 1e3 * bench_ms(from_hbm(base, copies))
        bf16 = [wb] + [wb.clone() for _ in range(n_copies(2 * wb.numel()) - 1)]
        row["bf16_gemv"] = {"us": 1e3 * bench_ms(from_hbm(lambda t: gemv_triton(x, t, gated=gated), bf16))}
        got = bf16_pipelined(x, wb, gated)
        row["bf16_pipelined"] = {"us": 1e3 * bench_ms(from_hbm(lambda t: bf16_pipelined(x, t, gated), bf16)),
                                 "rel_err": float((got.double() - want).norm() / want.norm())}
        del bf16
        cells = "  ".join(f"{k} {v['us']:6.2f}" for k, v in row.items() if isinstance(v, dict) and "us" in v)
        print(f"{name:8s} default {row['default_us']:6.2f} / {row['default_again_us']:6.2f} us  {cells}", flush=True)
        del copies, q8, s8, wb
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
