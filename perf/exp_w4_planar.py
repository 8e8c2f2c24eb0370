"""Experiment (session 7): a batch-1 W4A16 GEMV over a group-planar INT4 layout, timed from HBM against the GEMV
of backend/kernels/quant_matmul.py, then in the engine.

Group-planar: within each group of G input columns (G / 8 int32 words per row), word j holds at nibble i (bits
4i..4i+3) the code of column i * G / 8 + j. So the x values that nibble i of a row's words meets are one
contiguous slice of x, loaded in the layout of the words themselves (the packed-pair layout needs x at stride 8,
which Triton stages through shared memory with a barrier per nibble).

    python3 perf/exp_w4_planar.py --out $OUT/exp_w4_planar.json
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


def pack_planar(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = codes.shape
    wg = group_size // 8
    c = codes.to(torch.int64).view(N, K // group_size, 8, wg)
    words = sum(c[:, :, i, :] << (4 * i) for i in range(8))
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).view(N, K // 8).contiguous()


@triton.jit
def w4_planar_gemv(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, sw_n, ss_n, GROUP_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, MODE: tl.constexpr):
    WG: tl.constexpr = GROUP_SIZE // 8
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    w_rows = w_ptr + rows64[:, None, None] * sw_n
    sz_rows = rows64[:, None] * ss_n
    acc = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
    gi = tl.arange(0, GROUPS)
    j = tl.arange(0, WG)
    for g0 in range(0, K // GROUP_SIZE, GROUPS):
        group = g0 + gi
        word = group[:, None] * WG + j[None, :]
        packed = tl.load(w_rows + word[None, :, :], mask=row_ok[:, None, None], other=0)
        s = tl.load(s_ptr + sz_rows + group[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_rows + group[None, :], mask=row_ok[:, None], other=0).to(tl.float32)
        col0 = group[:, None] * GROUP_SIZE + j[None, :]
        if MODE == 0:  # I2F per nibble, zero point via sum(x)
            dot = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
            x_sum = tl.zeros([GROUPS, WG], dtype=tl.float32)
            for i in tl.static_range(8):
                x_i = tl.load(x_ptr + col0 + i * WG).to(tl.float32)
                q_i = ((packed >> (4 * i)) & 0xF).to(tl.float32)
                dot += q_i * x_i[None, :, :]
                x_sum += x_i
            acc += s[:, :, None] * (dot - z[:, :, None] * x_sum[None, :, :])
        elif MODE == 1:  # 2^23 bias per nibble, zero point folded into the subtraction (exact)
            zb = (z + 8388608.0)[:, :, None]
            dot = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
            for i in tl.static_range(8):
                x_i = tl.load(x_ptr + col0 + i * WG).to(tl.float32)
                q_i = (((packed >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zb
                dot += q_i * x_i[None, :, :]
            acc += s[:, :, None] * dot
        else:  # nibble masked in place (no shift): (q - z) * 16^i exact, one accumulator per power of 16
            # MODE 3: the mask-and-or as one lop3 with both constants in registers (ptxas splits it in two when
            # they are immediates)
            high = packed >> 16
            magic = tl.full([BLOCK_N, GROUPS, WG], 0x4B000000, tl.int32)
            d0 = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
            d1 = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
            d2 = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
            d3 = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
            for i in tl.static_range(4):
                zb = (z * (16.0 ** i) + 8388608.0)[:, :, None]
                x_lo = tl.load(x_ptr + col0 + i * WG).to(tl.float32)[None, :, :]
                x_hi = tl.load(x_ptr + col0 + (i + 4) * WG).to(tl.float32)[None, :, :]
                if MODE == 3:
                    mask = tl.full([BLOCK_N, GROUPS, WG], 0xF << (4 * i), tl.int32)
                    q_lo = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                                     [packed, mask, magic], dtype=tl.int32, is_pure=True, pack=1)
                    q_hi = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                                     [high, mask, magic], dtype=tl.int32, is_pure=True, pack=1)
                    q_lo = q_lo.to(tl.float32, bitcast=True) - zb
                    q_hi = q_hi.to(tl.float32, bitcast=True) - zb
                else:
                    q_lo = ((packed & (0xF << (4 * i))) | 0x4B000000).to(tl.float32, bitcast=True) - zb
                    q_hi = ((high & (0xF << (4 * i))) | 0x4B000000).to(tl.float32, bitcast=True) - zb
                if i == 0:
                    d0 += q_lo * x_lo
                    d0 += q_hi * x_hi
                elif i == 1:
                    d1 += q_lo * x_lo
                    d1 += q_hi * x_hi
                elif i == 2:
                    d2 += q_lo * x_lo
                    d2 += q_hi * x_hi
                else:
                    d3 += q_lo * x_lo
                    d3 += q_hi * x_hi
            acc += s[:, :, None] * (d0 + d1 * (1.0 / 16) + d2 * (1.0 / 256) + d3 * (1.0 / 4096))
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def w4_planar_gemv2(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, sw_n, ss_n, GROUP_SIZE: tl.constexpr,
                    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """MODE 3 over two row tiles (rows r.. and r + BLOCK_N..) in the same layout, so each x value a thread loads
    and converts serves two rows."""
    WG: tl.constexpr = GROUP_SIZE // 8
    rows_a = tl.program_id(0) * (2 * BLOCK_N) + tl.arange(0, BLOCK_N)
    rows_b = rows_a + BLOCK_N
    ok_a, ok_b = rows_a < N, rows_b < N
    wa = w_ptr + rows_a.to(tl.int64)[:, None, None] * sw_n
    wb = w_ptr + rows_b.to(tl.int64)[:, None, None] * sw_n
    sa = rows_a.to(tl.int64)[:, None] * ss_n
    sb = rows_b.to(tl.int64)[:, None] * ss_n
    acc_a = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
    gi = tl.arange(0, GROUPS)
    j = tl.arange(0, WG)
    magic = tl.full([BLOCK_N, GROUPS, WG], 0x4B000000, tl.int32)
    for g0 in range(0, K // GROUP_SIZE, GROUPS):
        group = g0 + gi
        word = (group[:, None] * WG + j[None, :])[None, :, :]
        pa = tl.load(wa + word, mask=ok_a[:, None, None], other=0)
        pb = tl.load(wb + word, mask=ok_b[:, None, None], other=0)
        za = tl.load(z_ptr + sa + group[None, :], mask=ok_a[:, None], other=0).to(tl.float32)[:, :, None]
        zb = tl.load(z_ptr + sb + group[None, :], mask=ok_b[:, None], other=0).to(tl.float32)[:, :, None]
        ha, hb = pa >> 16, pb >> 16
        col0 = group[:, None] * GROUP_SIZE + j[None, :]
        da = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
        db = tl.zeros([BLOCK_N, GROUPS, WG], dtype=tl.float32)
        for i in tl.static_range(4):
            unshift = 1.0 / (16.0 ** i)  # exact: x * 16^-i times (q - z) * 16^i
            x_lo = (tl.load(x_ptr + col0 + i * WG).to(tl.float32) * unshift)[None, :, :]
            x_hi = (tl.load(x_ptr + col0 + (i + 4) * WG).to(tl.float32) * unshift)[None, :, :]
            mask = tl.full([BLOCK_N, GROUPS, WG], 0xF << (4 * i), tl.int32)
            bias_a = za * (16.0 ** i) + 8388608.0
            bias_b = zb * (16.0 ** i) + 8388608.0
            qa_lo = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [pa, mask, magic],
                                              dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
            qa_hi = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [ha, mask, magic],
                                              dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
            qb_lo = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [pb, mask, magic],
                                              dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
            qb_hi = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [hb, mask, magic],
                                              dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
            da += (qa_lo - bias_a) * x_lo
            da += (qa_hi - bias_a) * x_hi
            db += (qb_lo - bias_b) * x_lo
            db += (qb_hi - bias_b) * x_hi
        s_a = tl.load(s_ptr + sa + group[None, :], mask=ok_a[:, None], other=0.0).to(tl.float32)[:, :, None]
        s_b = tl.load(s_ptr + sb + group[None, :], mask=ok_b[:, None], other=0.0).to(tl.float32)[:, :, None]
        acc_a += s_a * da
        acc_b += s_b * db
    tl.store(out_ptr + rows_a, tl.sum(tl.sum(acc_a, axis=2), axis=1).to(out_ptr.dtype.element_ty), mask=ok_a)
    tl.store(out_ptr + rows_b, tl.sum(tl.sum(acc_b, axis=2), axis=1).to(out_ptr.dtype.element_ty), mask=ok_b)


def planar_gemv(x, words, scales, zeros, group_size, tile):
    N, K = words.shape[0], words.shape[1] * 8
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    common = dict(GROUP_SIZE=group_size, BLOCK_N=tile["BLOCK_N"], GROUPS=tile["GROUPS"], num_warps=tile["num_warps"])
    if tile["MODE"] == 4:
        w4_planar_gemv2[(triton.cdiv(N, 2 * tile["BLOCK_N"]),)](
            x, words, scales, zeros, out, N, K, words.stride(0), scales.stride(0), **common)
    else:
        w4_planar_gemv[(triton.cdiv(N, tile["BLOCK_N"]),)](
            x, words, scales, zeros, out, N, K, words.stride(0), scales.stride(0), MODE=tile["MODE"], **common)
    return out


TILES = ([dict(BLOCK_N=b, GROUPS=g, num_warps=w, MODE=m) for m in (0, 1) for b, g, w in ((8, 4, 4), (16, 4, 4), (8, 8, 8))]
         + [dict(BLOCK_N=b, GROUPS=g, num_warps=w, MODE=3)
            for b, g, w in ((4, 4, 4), (8, 4, 4), (16, 4, 4), (8, 8, 8), (16, 8, 8), (32, 4, 4))]
         + [dict(BLOCK_N=b, GROUPS=g, num_warps=w, MODE=4)
            for b, g, w in ((4, 4, 4), (8, 4, 4), (8, 2, 2), (8, 8, 8), (16, 4, 4), (16, 8, 8))])


def tune_shape(N: int, K: int) -> dict:
    from backend.kernels.gemv import gemv_triton
    from perf.bench_quant import bench_ms
    from perf.tune_quant_gemv import from_hbm, n_copies

    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * 0.02
    q4, s4, z4 = rtn.quantize_int4(w, 128)
    p4 = qm.pack_int4(q4)
    words = pack_planar(q4, 128)
    want = x.double() @ qm.dequantize_int4(p4, s4, z4, 128).double().T
    nbytes = p4.numel() + s4.numel() * s4.element_size() + z4.numel()
    copies = n_copies(nbytes)
    old = [(p4, s4, z4)] + [(p4.clone(), s4.clone(), z4.clone()) for _ in range(copies - 1)]
    new = [(words, s4, z4)] + [(words.clone(), s4.clone(), z4.clone()) for _ in range(copies - 1)]
    bf16 = [w.bfloat16() for _ in range(n_copies(2 * w.numel()))]
    out = {"bytes": nbytes, "gemv_bf16_us": 1e3 * bench_ms(from_hbm(lambda wb: gemv_triton(x, wb), bf16))}
    del bf16
    err = lambda got: float((got.double() - want).norm() / want.norm())
    out["old_err"] = err(qm.w4a16_gemv_triton(x, p4, s4, z4, 128))
    out["old_us"] = 1e3 * bench_ms(from_hbm(lambda t: qm.w4a16_gemv_triton(x, *t, 128), old))
    out["tiles"] = []
    for tile in TILES:
        e = err(planar_gemv(x, words, s4, z4, 128, tile))
        us = 1e3 * bench_ms(from_hbm(lambda t: planar_gemv(x, *t, 128, tile), new))
        out["tiles"].append(dict(tile, us=us, GB_s=nbytes / us / 1e3, rel_err=e))
    out["best"] = min(out["tiles"], key=lambda t: t["us"])
    return out


class PlanarPatch:
    """Routes qm.w4a16_gemv_triton to the planar GEMV (weights repacked once per layer, at warm-up, before any
    CUDA-graph capture), with one tile per shape."""

    def __init__(self, tiles: dict):
        self.tiles, self.cache, self.original = tiles, {}, qm.w4a16_gemv_triton

    def __call__(self, x, qweight, scales, zeros, group_size, tile=None):
        key = qweight.data_ptr()
        if key not in self.cache:
            self.cache[key] = pack_planar(qm.unpack_int4(qweight), group_size)
        N, K = qweight.shape[0], qweight.shape[1] * 2
        return planar_gemv(x.contiguous(), self.cache[key], scales, zeros, group_size, self.tiles[(N, K)])

    def __enter__(self):
        qm.w4a16_gemv_triton = self
        return self

    def __exit__(self, *exc):
        qm.w4a16_gemv_triton = self.original


def main() -> None:
    from perf.bench_quant import LINEARS, engine_run

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="exp_w4_planar.json")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "shapes": {}}
    best = {}
    for name, N, K in LINEARS:
        r = results["shapes"][name] = tune_shape(N, K)
        best[(N, K)] = {k: v for k, v in r["best"].items() if k not in ("us", "GB_s", "rel_err")}
        by_mode = {}
        for t in r["tiles"]:
            if t["MODE"] not in by_mode or t["us"] < by_mode[t["MODE"]]["us"]:
                by_mode[t["MODE"]] = t
        modes = "  ".join(f"m{m} {t['us']:5.1f} ({t['GB_s']:4.0f} GB/s, {t['BLOCK_N']}x{t['GROUPS']}/{t['num_warps']}, "
                          f"err {t['rel_err']:.1e})" for m, t in sorted(by_mode.items()))
        print(f"{name:8s} bf16 GEMV {r['gemv_bf16_us']:5.1f} us  old INT4 {r['old_us']:5.1f} us "
              f"({r['bytes'] / r['old_us'] / 1e3:4.0f} GB/s, err {r['old_err']:.1e})  planar: {modes}", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if not args.skip_engine:
        engine = results["engine"] = {}
        runs = [("bf16", "bf16", None), ("int4_wo old", "int4_wo", None), ("int4_wo planar", "int4_wo", best),
                ("int4_wo+head planar", "int4_wo+head", best)]
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
