"""Experiment (session 6): INT8 GEMV over int8 bytes (16-byte loads, no layout shuffles), converting each weight
with I2F or with the 2^23 mantissa trick (one LOP3 and one FADD, full-rate ALU), against the current int32-word
GEMV, from HBM on the Llama-3-8B projections."""
import json, os, sys
import torch
import triton
import triton.language as tl
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backend.engine.quantization import rtn
from backend.kernels import quant_matmul as qm
from perf.bench_quant import LINEARS, bench_ms
from perf.tune_quant_gemv import from_hbm, n_copies


@triton.jit
def w8_bytes(x_ptr, w_ptr, s_ptr, out_ptr, N, K, sw_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             MAGIC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * sw_n + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs + k0, mask=row_ok[:, None], other=0)
        x = tl.load(x_ptr + k0 + cols).to(tl.float32)
        if MAGIC:  # 2^23 + (q + 128) as float bits, minus 2^23 + 128: exact for every int8
            u = w.to(tl.uint8, bitcast=True).to(tl.int32)
            wf = ((u ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        else:
            wf = w.to(tl.float32)
        acc += wf * x[None, :]
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, (tl.sum(acc, axis=1) * s).to(out_ptr.dtype.element_ty), mask=row_ok)


def run(x, q, s, bn, bk, warps, magic):
    N, K = q.shape
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    w8_bytes[(triton.cdiv(N, bn),)](x, q, s, out, N, K, q.stride(0), BLOCK_N=bn, BLOCK_K=bk, MAGIC=magic,
                                    num_warps=warps)
    return out


rows = {}
for name, N, K in LINEARS + [("lm_head", 128256, 4096)]:
    w = torch.randn(N, K, device="cuda") * 0.02
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    q, s = rtn.quantize_int8(w)
    c8 = [(q.clone(), s.clone()) for _ in range(n_copies(q.numel()))]
    want = x.double() @ (q.double() * s.double()[:, None]).T
    nb = q.numel() + 2 * N
    r = {"current": 1e3 * bench_ms(from_hbm(lambda t: qm.w8a16_gemv_triton(x, *t), c8))}
    for magic in (False, True):
        for bn in (4, 8, 16):
            for bk in (512, 1024, 2048):
                for warps in (4, 8):
                    got = run(x, q, s, bn, bk, warps, magic)
                    err = float((got.double() - want).norm() / want.norm())
                    assert err < 1e-2, (name, err)
                    r[f"{'magic' if magic else 'i2f'} {bn}x{bk}/{warps}"] = 1e3 * bench_ms(
                        from_hbm(lambda t, a=(bn, bk, warps, magic): run(x, *t, *a), c8))
    del c8
    torch.cuda.empty_cache()
    rows[name] = r
    bi = min((v, k) for k, v in r.items() if k.startswith("i2f"))
    bm = min((v, k) for k, v in r.items() if k.startswith("magic"))
    print(f"{name:8s} current {r['current']:6.1f} us ({nb / r['current'] / 1e6:.2f} TB/s)  i2f {bi[0]:6.1f} ({nb / bi[0] / 1e6:.2f}) {bi[1]}"
          f"  magic {bm[0]:6.1f} ({nb / bm[0] / 1e6:.2f}) {bm[1]}", flush=True)
json.dump(rows, open(sys.argv[1] if len(sys.argv) > 1 else "exp_w8_convert.json", "w"), indent=1)
