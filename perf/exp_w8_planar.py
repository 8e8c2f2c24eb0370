"""Experiment (session 8): the batch-1 W8A16 GEMV over byte-planar INT8 words, timed from HBM against the GEMV of
backend/kernels/quant_matmul.py, then in the engine.

Byte-planar (the INT8 form of session 7's group-planar INT4): within blocks of B input columns (B / 4 int32 words
per row), word j holds at byte i the code of column i * B / 4 + j, offset by 128 (unsigned). Byte plane i of a
row's words meets one contiguous slice of x, so the x loads stay in the words' layout (the row-major INT8 words
need x at stride 4, which Triton stages through shared memory, or loads 2 bytes at a time), and the weight words
load 16 bytes at a time (the current kernel's mask on K's words defeats that).

Conversion per byte, two forms (MODE):
  0: lop3 -- (word & 0xFF << 8i) | 2^23's exponent, bytes 2 and 3 after one shift of the word by 16: the float
     2^23 + u * 256^i exactly; subtract 2^23 + 128 * 256^i, multiply by x * 256^-i (both exact scalings).
  1: prmt -- one byte permute builds 2^23 + u directly from byte i and 2^23's exponent byte (no shift, no power).

    python3 perf/exp_w8_planar.py --out $OUT/exp_w8_planar.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.quantization import rtn  # noqa: E402
from backend.kernels import quant_matmul as qm  # noqa: E402
from backend.kernels._pdl import pdl_args  # noqa: E402


def pack_planar_int8(q: torch.Tensor, block: int) -> torch.Tensor:
    """int8 [N, K] (K a multiple of block) -> int32 [N, K / 4], byte i of word j of block b = q[b*B + i*B/4 + j] + 128."""
    N, K = q.shape
    u = (q.to(torch.int32) + 128).view(N, K // block, 4, block // 4)
    words = u[:, :, 0, :] | (u[:, :, 1, :] << 8) | (u[:, :, 2, :] << 16) | (u[:, :, 3, :] << 24)  # wraps in int32
    return words.reshape(N, K // 4).contiguous()


# prmt selector nibbles, low first: byte i of the word, two zero bytes and 0x4B (2^23's exponent byte) of the constant
PRMT_BYTE0 = tl.constexpr("prmt.b32 $0, $1, $2, 0x7440;")
PRMT_BYTE1 = tl.constexpr("prmt.b32 $0, $1, $2, 0x7441;")
PRMT_BYTE2 = tl.constexpr("prmt.b32 $0, $1, $2, 0x7442;")
PRMT_BYTE3 = tl.constexpr("prmt.b32 $0, $1, $2, 0x7443;")


@triton.jit
def w8_planar_gemv(x_ptr, w_ptr, s_ptr, out_ptr, N, K, num_blocks, sw_n, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCKS: tl.constexpr, MODE: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
    WORDS: tl.constexpr = BLOCK // 4
    rows_a = tl.program_id(0) * (2 * BLOCK_N) + tl.arange(0, BLOCK_N)
    rows_b = rows_a + BLOCK_N
    ok_a, ok_b = rows_a < N, rows_b < N
    wa = w_ptr + rows_a.to(tl.int64)[:, None, None] * sw_n
    wb = w_ptr + rows_b.to(tl.int64)[:, None, None] * sw_n
    acc_a = tl.zeros([BLOCK_N, BLOCKS, WORDS], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCKS, WORDS], dtype=tl.float32)
    j = tl.arange(0, WORDS)
    exponent = tl.full([BLOCK_N, BLOCKS, WORDS], 0x4B000000, tl.int32)
    for b0 in range(0, num_blocks, BLOCKS):
        block = b0 + tl.arange(0, BLOCKS)
        word = (block[:, None] * WORDS + j[None, :])[None, :, :]
        pa = tl.load(wa + word, mask=ok_a[:, None, None], other=0)
        pb = tl.load(wb + word, mask=ok_b[:, None, None], other=0)
        column = block[:, None] * BLOCK + j[None, :]
        if MODE == 0:
            ha, hb = pa >> 16, pb >> 16
            for i in tl.static_range(2):
                unshift = 1.0 / (256.0 ** i)
                bias = 128.0 * (256.0 ** i) + 8388608.0
                x_lo = (tl.load(x_ptr + column + i * WORDS).to(tl.float32) * unshift)[None, :, :]
                x_hi = (tl.load(x_ptr + column + (i + 2) * WORDS).to(tl.float32) * unshift)[None, :, :]
                mask = tl.full([BLOCK_N, BLOCKS, WORDS], 0xFF << (8 * i), tl.int32)
                qa_lo = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [pa, mask, exponent],
                                                  dtype=tl.int32, is_pure=True, pack=1)
                qa_hi = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [ha, mask, exponent],
                                                  dtype=tl.int32, is_pure=True, pack=1)
                qb_lo = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [pb, mask, exponent],
                                                  dtype=tl.int32, is_pure=True, pack=1)
                qb_hi = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [hb, mask, exponent],
                                                  dtype=tl.int32, is_pure=True, pack=1)
                acc_a += (qa_lo.to(tl.float32, bitcast=True) - bias) * x_lo
                acc_a += (qa_hi.to(tl.float32, bitcast=True) - bias) * x_hi
                acc_b += (qb_lo.to(tl.float32, bitcast=True) - bias) * x_lo
                acc_b += (qb_hi.to(tl.float32, bitcast=True) - bias) * x_hi
        else:
            for i in tl.static_range(4):
                x_i = tl.load(x_ptr + column + i * WORDS).to(tl.float32)[None, :, :]
                if i == 0:
                    qa = tl.inline_asm_elementwise(PRMT_BYTE0, "=r,r,r", [pa, exponent], dtype=tl.int32, is_pure=True, pack=1)
                    qb = tl.inline_asm_elementwise(PRMT_BYTE0, "=r,r,r", [pb, exponent], dtype=tl.int32, is_pure=True, pack=1)
                elif i == 1:
                    qa = tl.inline_asm_elementwise(PRMT_BYTE1, "=r,r,r", [pa, exponent], dtype=tl.int32, is_pure=True, pack=1)
                    qb = tl.inline_asm_elementwise(PRMT_BYTE1, "=r,r,r", [pb, exponent], dtype=tl.int32, is_pure=True, pack=1)
                elif i == 2:
                    qa = tl.inline_asm_elementwise(PRMT_BYTE2, "=r,r,r", [pa, exponent], dtype=tl.int32, is_pure=True, pack=1)
                    qb = tl.inline_asm_elementwise(PRMT_BYTE2, "=r,r,r", [pb, exponent], dtype=tl.int32, is_pure=True, pack=1)
                else:
                    qa = tl.inline_asm_elementwise(PRMT_BYTE3, "=r,r,r", [pa, exponent], dtype=tl.int32, is_pure=True, pack=1)
                    qb = tl.inline_asm_elementwise(PRMT_BYTE3, "=r,r,r", [pb, exponent], dtype=tl.int32, is_pure=True, pack=1)
                acc_a += (qa.to(tl.float32, bitcast=True) - 8388736.0) * x_i
                acc_b += (qb.to(tl.float32, bitcast=True) - 8388736.0) * x_i
    if PDL:
        gdc_launch_dependents()
    s_a = tl.load(s_ptr + rows_a, mask=ok_a, other=0.0)
    s_b = tl.load(s_ptr + rows_b, mask=ok_b, other=0.0)
    tl.store(out_ptr + rows_a, (tl.sum(tl.sum(acc_a, axis=2), axis=1) * s_a).to(out_ptr.dtype.element_ty), mask=ok_a)
    tl.store(out_ptr + rows_b, (tl.sum(tl.sum(acc_b, axis=2), axis=1) * s_b).to(out_ptr.dtype.element_ty), mask=ok_b)


def planar_gemv(x, words, scales, tile):
    N, K = words.shape[0], words.shape[1] * 4
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    w8_planar_gemv[(triton.cdiv(N, 2 * tile["BLOCK_N"]),)](
        x, words, scales, out, N, K, K // tile["BLOCK"], words.stride(0), BLOCK=tile["BLOCK"], BLOCK_N=tile["BLOCK_N"],
        BLOCKS=tile["BLOCKS"], MODE=tile["MODE"], num_warps=tile["num_warps"], **pdl_args(x.device))
    return out


# BLOCKS * B / 4 < 32 * num_warps keeps the x loads in the words' layout (see _w4a16_gemv_kernel's comment)
TILES = [dict(BLOCK=bk, BLOCK_N=bn, BLOCKS=bl, num_warps=w, MODE=m)
         for m in (0, 1) for bk in (64, 128) for bn in (4, 8, 16) for bl in (1, 2, 4, 8) for w in (4, 8)
         if bl * bk // 4 < 32 * w and bl * bk // 4 >= 32 * w // 4]
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096)]


def tune_shape(N: int, K: int, blocks: tuple) -> dict:
    from backend.kernels.gemv import gemv_triton
    from perf.bench_quant import bench_ms
    from perf.tune_quant_gemv import from_hbm, n_copies

    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * 0.02
    q8, s8 = rtn.quantize_int8(w)
    del w
    want = x.double() @ (q8.double() * s8.double()[:, None]).T
    nbytes = q8.numel() + s8.numel() * 4
    copies = n_copies(nbytes)
    out = {"bytes": nbytes}
    if N * K * 2 * n_copies(2 * N * K) < 20e9:
        wb = (torch.randn(N, K, device="cuda") * 0.02).bfloat16()
        bf16 = [wb] + [wb.clone() for _ in range(n_copies(2 * wb.numel()) - 1)]
        out["gemv_bf16_us"] = 1e3 * bench_ms(from_hbm(lambda t: gemv_triton(x, t), bf16))
        del bf16, wb
    err = lambda got: float((got.double() - want).norm() / want.norm())
    old = [(q8, s8)] + [(q8.clone(), s8.clone()) for _ in range(copies - 1)]
    out["old_err"] = err(qm.w8a16_gemv_triton(x, q8, s8))
    out["old_us"] = 1e3 * bench_ms(from_hbm(lambda t: qm.w8a16_gemv_triton(x, *t), old))
    del old
    out["tiles"] = []
    for block in blocks:
        words = pack_planar_int8(q8, block)
        new = [(words, s8)] + [(words.clone(), s8.clone()) for _ in range(copies - 1)]
        for tile in TILES:
            if tile["BLOCK"] != block:
                continue
            e = err(planar_gemv(x, words, s8, tile))
            us = 1e3 * bench_ms(from_hbm(lambda t: planar_gemv(x, *t, tile), new))
            out["tiles"].append(dict(tile, us=us, GB_s=nbytes / us / 1e3, rel_err=e))
        del new, words
    out["best"] = min(out["tiles"], key=lambda t: t["us"])
    return out


class PlanarPatch:
    """Routes qm.w8a16_gemv_triton to the planar GEMV (weights repacked once per layer at their first batch-1 call,
    which the engine makes eagerly before capturing CUDA graphs), with one tile per shape."""

    def __init__(self, tiles: dict):
        self.tiles, self.cache, self.original = tiles, {}, qm.w8a16_gemv_triton

    def __call__(self, x, qweight, scales, tile=None):
        key = qweight.data_ptr()
        tile = self.tiles[tuple(qweight.shape)]
        if key not in self.cache:
            self.cache[key] = pack_planar_int8(qweight, tile["BLOCK"])
        return planar_gemv(x.contiguous(), self.cache[key], scales, tile)

    def __enter__(self):
        qm.w8a16_gemv_triton = self
        return self

    def __exit__(self, *exc):
        qm.w8a16_gemv_triton = self.original


def main() -> None:
    from perf.bench_quant import engine_run

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="exp_w8_planar.json")
    parser.add_argument("--blocks", default="64,128")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    blocks = tuple(int(b) for b in args.blocks.split(","))
    results = {"device": torch.cuda.get_device_name(), "shapes": {}}
    best = {}
    for name, N, K in SHAPES:
        r = results["shapes"][name] = tune_shape(N, K, blocks)
        best[(N, K)] = {k: v for k, v in r["best"].items() if k not in ("us", "GB_s", "rel_err")}
        by_kind = {}
        for t in r["tiles"]:
            kind = (t["MODE"], t["BLOCK"])
            if kind not in by_kind or t["us"] < by_kind[kind]["us"]:
                by_kind[kind] = t
        kinds = "  ".join(f"m{m}/B{b} {t['us']:5.1f} ({t['GB_s']:4.0f} GB/s, {t['BLOCK_N']}x{t['BLOCKS']}/{t['num_warps']}, "
                          f"err {t['rel_err']:.0e})" for (m, b), t in sorted(by_kind.items()))
        print(f"{name:8s} bf16 {r.get('gemv_bf16_us', 0):5.1f} us  INT8 now {r['old_us']:5.1f} us "
              f"({r['bytes'] / r['old_us'] / 1e3:4.0f} GB/s, err {r['old_err']:.0e})  planar: {kinds}", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.skip_engine:
        return
    engine = results["engine"] = {}
    runs = [("bf16", "bf16", None), ("int8_wo+head now", "int8_wo+head", None),
            ("int8_wo+head planar", "int8_wo+head", best), ("int8_wo planar", "int8_wo", best)]
    for key, method, tiles in runs:
        if tiles is None:
            engine[key] = engine_run(method, None, (1,))
        else:
            with PlanarPatch(tiles):
                engine[key] = engine_run(method, None, (1,))
        rate = engine[key]["decode_b1_tok_s"]
        print(f"engine batch-1 decode {key:22s} {rate:7.1f} tok/s = {rate / engine['bf16']['decode_b1_tok_s']:.2f}x bf16",
              flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
