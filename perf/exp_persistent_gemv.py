"""Experiment (session 6): a persistent INT8 / bf16 GEMV (a fixed grid of programs, each walking several row
blocks in one flattened loop, so loads stay in flight across row-block boundaries) against the current GEMVs,
timed from HBM on the Llama-3-8B projections."""
import json, os, sys
import torch
import triton
import triton.language as tl
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backend.engine.quantization import rtn
from backend.kernels import quant_matmul as qm
from backend.kernels.gemv import gemv_triton
from perf.bench_quant import LINEARS, bench_ms
from perf.tune_quant_gemv import from_hbm, n_copies


@triton.jit
def w8_persistent(x_ptr, w_ptr, s_ptr, out_ptr, N, K, sw_n, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                  PROGRAMS):
    pid = tl.program_id(0)
    num_words = K // 4
    chunks = tl.cdiv(num_words, WORDS)
    row_blocks = tl.cdiv(N, BLOCK_N)
    total = tl.cdiv(row_blocks - pid, PROGRAMS) * chunks
    words = tl.arange(0, WORDS)
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    for it in range(0, total):
        rb = pid + (it // chunks) * PROGRAMS
        c = it % chunks
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        word = c * WORDS + words
        packed = tl.load(w_ptr + rows.to(tl.int64)[:, None] * sw_n + word[None, :], mask=row_ok[:, None], other=0)
        for i in tl.static_range(4):
            x_i = tl.load(x_ptr + 4 * word + i).to(tl.float32)
            acc += ((packed << (24 - 8 * i)) >> 24).to(tl.float32) * x_i[None, :]
        if c == chunks - 1:
            s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows, (tl.sum(acc, axis=1) * s).to(out_ptr.dtype.element_ty), mask=row_ok)
            acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)


@triton.jit
def bf16_persistent(x_ptr, w_ptr, out_ptr, N, K, sw_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PROGRAMS):
    pid = tl.program_id(0)
    chunks = tl.cdiv(K, BLOCK_K)
    row_blocks = tl.cdiv(N, BLOCK_N)
    total = tl.cdiv(row_blocks - pid, PROGRAMS) * chunks
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for it in range(0, total):
        rb = pid + (it // chunks) * PROGRAMS
        c = it % chunks
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        k = c * BLOCK_K + cols
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * sw_n + k[None, :], mask=row_ok[:, None], other=0.0)
        x = tl.load(x_ptr + k)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        if c == chunks - 1:
            tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)


def run_w8(x, q, s, bn, words, programs, warps, stages):
    N, K = q.shape
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    w = q.view(torch.int32)
    w8_persistent[(programs,)](x, w, s, out, N, K, w.stride(0), BLOCK_N=bn, WORDS=words, PROGRAMS=programs,
                               num_warps=warps, num_stages=stages)
    return out


def run_bf16(x, w, bn, bk, programs, warps, stages):
    N, K = w.shape
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    bf16_persistent[(programs,)](x, w, out, N, K, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, PROGRAMS=programs,
                                 num_warps=warps, num_stages=stages)
    return out


sms = torch.cuda.get_device_properties(0).multi_processor_count
rows = {}
for name, N, K in LINEARS:
    w = torch.randn(N, K, device="cuda") * 0.02
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    q, s = rtn.quantize_int8(w)
    r = {}
    c8 = [(q.clone(), s.clone()) for _ in range(n_copies(q.numel()))]
    want = x.double() @ (q.double() * s.double()[:, None]).T
    nb8 = q.numel() + 2 * N
    r["w8 current"] = 1e3 * bench_ms(from_hbm(lambda t: qm.w8a16_gemv_triton(x, *t), c8))
    for bn in (4, 8, 16):
        for words in (128, 256):
            for per_sm in (2, 4, 8):
                for warps in (4, 8):
                    for stages in (2, 3):
                        programs = per_sm * sms
                        got = run_w8(x, q, s, bn, words, programs, warps, stages)
                        err = float((got.double() - want).norm() / want.norm())
                        assert err < 1e-2, (name, err)
                        us = 1e3 * bench_ms(from_hbm(lambda t, a=(bn, words, programs, warps, stages): run_w8(x, *t, *a), c8))
                        r[f"w8 p {bn}x{words} {per_sm}/sm w{warps} s{stages}"] = us
    del c8
    wb = w.to(torch.bfloat16)
    cb = [wb.clone() for _ in range(n_copies(wb.numel() * 2))]
    r["bf16 current"] = 1e3 * bench_ms(from_hbm(lambda t: gemv_triton(x, t), cb))
    for bn in (4, 8):
        for bk in (512, 1024):
            for per_sm in (2, 4, 8):
                for warps in (4, 8):
                    for stages in (2, 3):
                        programs = per_sm * sms
                        us = 1e3 * bench_ms(from_hbm(lambda t, a=(bn, bk, programs, warps, stages): run_bf16(x, t, *a), cb))
                        r[f"bf16 p {bn}x{bk} {per_sm}/sm w{warps} s{stages}"] = us
    del cb
    torch.cuda.empty_cache()
    rows[name] = r
    b8 = min((v, k) for k, v in r.items() if k.startswith("w8 p"))
    bb = min((v, k) for k, v in r.items() if k.startswith("bf16 p"))
    print(f"{name:8s} w8 current {r['w8 current']:6.1f} us ({nb8 / r['w8 current'] / 1e6:.2f} TB/s)  best persistent {b8[0]:6.1f} ({nb8 / b8[0] / 1e6:.2f}) {b8[1]}"
          f" | bf16 current {r['bf16 current']:6.1f} ({2 * N * K / r['bf16 current'] / 1e6:.2f})  best persistent {bb[0]:6.1f} ({2 * N * K / bb[0] / 1e6:.2f}) {bb[1]}", flush=True)
json.dump(rows, open(sys.argv[1] if len(sys.argv) > 1 else "exp_persistent_gemv.json", "w"), indent=1)
