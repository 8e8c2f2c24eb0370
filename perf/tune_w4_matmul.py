"""Paths and launch plans of the W4A16 product for M > 1 (backend/kernels/quant_matmul.py), on the GPU.

    python3 perf/tune_w4_matmul.py --out $OUT/tune_w4_matmul.json      # ~3-4 minutes on an H100
    TRITON_INTERPRET=1 python3 perf/tune_w4_matmul.py --smoke --out /tmp/tune_w4_matmul.json   # CPU check

For each Llama-3-8B projection (group 128) and M in 2, 16, 64, 128, 256, 2048: cuBLAS bf16 (F.linear on the
dequantized weight, the ceiling), the join kernel with its default plan, a few join plans (weight as the first
operand, column tile 64/128/256 x K tile 64/128 per row tile, then 3 and 4 pipeline stages for the two fastest;
split-K as quant_matmul.split_k gives it), and dequantize + cuBLAS (also the dequantize kernel alone). Every product
is timed inside a CUDA graph and checked against the float64 product of the dequantized weight. Prints a table last,
then the join tiles and the DEQUANT_MIN_M the measurements favour, in the form quant_matmul.W4_JOIN_TILES takes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.quantization import rtn  # noqa: E402
from backend.kernels import quant_matmul as qm  # noqa: E402

GROUP = 128
# (name, N, K) of the Llama-3-8B projections (as perf/bench_quant.py's LINEARS)
LINEARS = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
ROWS = (2, 16, 64, 128, 256, 2048)
# CPU smoke: K = 576 ends in a short group; 130 rows cross DEQUANT_MIN_M
SMOKE_LINEARS = [("tiny_a", 96, 256), ("tiny_b", 72, 576)]
SMOKE_ROWS = (2, 16, 130)
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "SWAP_AB")


def time_us(fn, rep_ms: int) -> float:
    """Mean time of one call, replayed from a CUDA graph (as the engine's decode runs); on CPU one plain call."""
    if torch.cuda.is_available():
        import triton.testing

        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms)
    start = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - start)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm().clamp(min=1e-30))


def row_tiles(M: int) -> list[int]:
    """The two largest of 16 / 64 / 128 rows that M fills (one for M <= 16)."""
    fitting = [b for b in (16, 64, 128) if b <= max(16, M)]
    return fitting[-2:]


def join_plan(M: int, N: int, K: int, device, block_m: int, block_n: int, stages: int) -> dict:
    block_k = qm.planar_block(K, GROUP)  # the join kernel's K tile is one planar block
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=stages, SWAP_AB=True,
                split=qm.split_k(M, N, K, block_m, block_n, block_k, device))


class Case:
    """One (projection, M): inputs, the float64 reference, and a timer that records error and time per variant."""

    def __init__(self, N: int, K: int, M: int, weight: dict, dtype: torch.dtype, rep_ms: int):
        self.N, self.K, self.M, self.rep_ms = N, K, M, rep_ms
        self.w = weight
        self.x = torch.randn(M, K, device=weight["dense"].device).to(dtype)
        self.want = self.x.double() @ weight["float64"].T

    def product(self, path: str, plan: dict | None = None):
        w = self.w
        return lambda: qm.w4a16_matmul_triton(self.x, w["words"], w["scales"], w["zeros"], GROUP, path=path,
                                              plan=plan)

    def measure(self, fn, want: torch.Tensor | None = None) -> dict:
        """Error against `want` (the float64 product unless given) and time; or why it did not run."""
        try:
            err = rel_err(fn(), self.want if want is None else want)
        except Exception as exc:  # noqa: BLE001 - a plan that does not compile (shared memory, registers)
            return dict(error=f"{type(exc).__name__}: {str(exc)[:120]}")
        return dict(us=time_us(fn, self.rep_ms), rel_err=err)


def quantized_weight(N: int, K: int, device, dtype) -> dict:
    w = torch.randn(N, K, device=device) * 0.02
    q, scales, zeros = rtn.quantize_int4(w, GROUP)
    packed = qm.pack_int4(q)
    deq = qm.dequantize_int4(packed, scales, zeros, GROUP)
    return dict(words=qm.to_planar_int4(packed, GROUP), scales=scales, zeros=zeros, dense=deq.to(dtype),
                float64=deq.double())


def join_sweep(case: Case, smoke: bool) -> list[dict]:
    """Column tiles at 3 stages per row tile, then 4 stages for the two fastest of them (the K tile is the planar
    block)."""
    M, N, K = case.M, case.N, case.K
    device = case.x.device
    column_tiles = [64] if smoke else [64, 128, 256]
    rows = []
    for block_m in row_tiles(M):
        first = [join_plan(M, N, K, device, block_m, n, 3) for n in column_tiles]
        timed = [dict(plan, **case.measure(case.product("join", plan))) for plan in first]
        rows += timed
        fastest = sorted((r for r in timed if "us" in r), key=lambda r: r["us"])[:1 if smoke else 2]
        for r in fastest:
            plan = dict({k: v for k, v in r.items() if k not in ("us", "rel_err")}, num_stages=4)
            rows.append(dict(plan, **case.measure(case.product("join", plan))))
    return rows


def tune(case: Case, smoke: bool) -> dict:
    M, N, K = case.M, case.N, case.K
    w = case.w
    default = qm.w4_join_plan(M, N, K, GROUP, case.x.device)
    out = {
        "cublas_bf16": case.measure(lambda: torch.nn.functional.linear(case.x, w["dense"])),
        "join_default": dict(case.measure(case.product("join")), plan=default),
        "dequant_cublas": case.measure(case.product("dequant")),
        "dequant_only": case.measure(lambda: qm.dequantize_int4_triton(w["words"], w["scales"], w["zeros"], GROUP, K,
                                                                       case.x.dtype), want=w["float64"]),
        "auto_path": "dequant_cublas" if qm.w4_takes_dequant(M, N, K, GROUP, case.x.device) else "join_default",
        "join_plans": join_sweep(case, smoke),
    }
    timed = [r for r in out["join_plans"] if "us" in r]
    out["join_best"] = min(timed, key=lambda r: r["us"]) if timed else None
    return out


def us(entry: dict | None) -> float:
    return entry["us"] if entry and "us" in entry else float("inf")


def tile_of(plan: dict) -> tuple:
    return tuple(plan[k] for k in TILE_KEYS)


def suggest_tiles(results: dict, rows: tuple) -> dict:
    """Per measured M, the join tile with the least total time relative to each projection's fastest join plan
    (a tile missing for a projection, e.g. failed to compile, counts as 10x)."""
    suggestion = {}
    for M in rows:
        cases = [r for key, r in results.items() if r["M"] == M and r["join_best"]]
        tiles = {tile_of(p) for r in cases for p in r["join_plans"] if "us" in p}
        def cost(tile):
            total = 0.0
            for r in cases:
                times = [p["us"] for p in r["join_plans"] if "us" in p and tile_of(p) == tile]
                total += min(times) / r["join_best"]["us"] if times else 10.0
            return total
        if tiles:
            best = min(tiles, key=cost)
            suggestion[M] = dict(dict(zip(TILE_KEYS, best)), cost_vs_best=cost(best) / len(cases))
    return suggestion


def suggest_threshold(results: dict, rows: tuple) -> int | None:
    """The smallest measured M from which dequantize + cuBLAS beats the best join plan summed over projections."""
    for M in rows:
        cases = [r for r in results.values() if r["M"] == M]
        dequant = sum(us(r["dequant_cublas"]) for r in cases)
        join = sum(min(us(r["join_best"]), us(r["join_default"])) for r in cases)
        if dequant < join:
            return M
    return None


def print_table(results: dict) -> None:
    print(f"\n{'shape':8s} {'M':>5s} {'cuBLAS':>8s} {'join':>8s} {'join*':>8s} {'deq+mm':>8s} "
          f"{'deq':>7s} {'auto/bf16':>9s}  best join plan (M,N,warps,stages,split)  max rel err")
    for r in results.values():
        auto = r[r["auto_path"]]
        best = r["join_best"] or {}
        plan = ",".join(str(best.get(k, "-")) for k in (*TILE_KEYS, "split"))
        errors = [e["rel_err"] for e in (r["cublas_bf16"], r["join_default"], r["dequant_cublas"], best)
                  if "rel_err" in e]
        print(f"{r['name']:8s} {r['M']:5d} {us(r['cublas_bf16']):8.1f} "
              f"{us(r['join_default']):8.1f} {us(best):8.1f} {us(r['dequant_cublas']):8.1f} "
              f"{us(r['dequant_only']):7.1f} {us(auto) / us(r['cublas_bf16']):9.2f}  {plan:36s} "
              f"{max(errors) if errors else float('nan'):.1e}")
    print("(us; join = default plan, join* = best plan of the sweep, deq = the dequantize kernel alone, "
          "auto = the default dispatch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tune_w4_matmul.json")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--shapes", default=",".join(name for name, _, _ in LINEARS))
    parser.add_argument("--rep-ms", type=int, default=10, help="CUDA-graph replay time per measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one plan per row tile (CPU interpreter)")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the interpreter's bf16 tl.dot is broken
    linears = SMOKE_LINEARS if args.smoke else [s for s in LINEARS if s[0] in args.shapes.split(",")]
    rows = SMOKE_ROWS if args.smoke else tuple(int(m) for m in args.rows.split(","))
    torch.manual_seed(0)
    start = time.perf_counter()
    results = {}
    summary = {"device": torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)", "dtype": str(dtype),
               "group_size": GROUP, "DEQUANT_MIN_M": qm.DEQUANT_MIN_M,
               "results": results}
    for name, N, K in linears:
        weight = quantized_weight(N, K, device, dtype)
        for M in rows:
            r = results[f"{name} M={M}"] = dict(name=name, N=N, K=K, M=M, **tune(Case(N, K, M, weight, dtype,
                                                                                      args.rep_ms), args.smoke))
            print(f"[{time.perf_counter() - start:5.0f} s] {name:8s} M={M:5d}  cuBLAS {us(r['cublas_bf16']):8.1f}  "
                  f"join {us(r['join_default']):8.1f} / best {us(r['join_best']):8.1f}  "
                  f"dequant+cuBLAS {us(r['dequant_cublas']):8.1f} us", flush=True)
        del weight
    summary["suggested_join_tiles"] = suggest_tiles(results, rows)
    summary["suggested_dequant_min_m"] = suggest_threshold(results, rows)
    summary["dequant_scratch_bytes"] = qm._DEQUANT_SCRATCH.nbytes()
    summary["seconds"] = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print_table(results)
    print("\nsuggested join tiles per M (mean time relative to each shape's best join plan):")
    for M, tile in summary["suggested_join_tiles"].items():
        print(f"  M={M:5d}: {tile}")
    print(f"suggested DEQUANT_MIN_M (first measured M where dequantize + cuBLAS wins in total): "
          f"{summary['suggested_dequant_min_m']}  (now {qm.DEQUANT_MIN_M});  {summary['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
