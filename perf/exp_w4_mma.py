"""The INT4 batch-1 GEMV on the tensor cores (quant_matmul's mma kernel, tile {"MMA_WARPS": W, "MMA_FOLD": f})
against the default tile of the bf16x2 pairs loop, per Llama-3-8B projection (gate_up gated, as in the engine).

    python3 perf/exp_w4_mma.py --out $OUT/exp_w4_mma.json

Each timing rotates over copies of the weights so they come from HBM (perf/tune_quant_gemv.py's from_hbm); each
variant's error is its output's distance from a float64 product of the same codes over the output's norm, so a
wrong lane mapping in the mma kernel shows here as an error near 1, not only in the tests.
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
from perf.bench_quant import LINEARS, bench_ms  # noqa: E402
from perf.tune_quant_gemv import from_hbm, n_copies  # noqa: E402

TILES = {"default": None, **{f"mma{w}{'f' if fold else ''}": {"MMA_WARPS": w, "MMA_FOLD": fold}
                             for w in (4, 8, 16) for fold in (False, True)},
         "mma8f:2": {"MMA_WARPS": 8, "MMA_FOLD": True, "MMA_STAGES": 2},
         "mma8f:3": {"MMA_WARPS": 8, "MMA_FOLD": True, "MMA_STAGES": 3}}


def time_projection(N: int, K: int, gated: bool, dtype: torch.dtype) -> dict:
    x = torch.randn(1, K, device="cuda").to(dtype)
    q4, s4, z4 = rtn.quantize_int4(torch.randn(N, K, device="cuda") * 0.02, 128)
    p4 = qm.pack_int4(q4)
    tensors = (qm.to_planar_int4(p4, 128), s4.to(dtype), z4)
    want = x.double() @ qm.dequantize_int4(p4, tensors[1], z4, 128).double().T
    if gated:
        gate, up = want.chunk(2, dim=-1)
        want = gate * torch.sigmoid(gate) * up
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    copies = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n_copies(nbytes) - 1)]
    out = {}
    for name, tile in TILES.items():
        gemv = lambda t, tile=tile: qm.w4a16_gemv_triton(x, *t, 128, tile=tile, gated=gated)  # noqa: E731
        err = float((gemv(tensors).double() - want).norm() / want.norm())
        us = 1e3 * bench_ms(from_hbm(gemv, copies))
        out[name] = dict(us=us, GB_s=nbytes / us / 1e3, rel_err=err)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="exp_w4_mma.json")
    parser.add_argument("--dtypes", default="bf16,fp16")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name()}
    for dtype_name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        for name, N, K in LINEARS:
            r = results[f"{dtype_name} {name}"] = time_projection(N, K, name == "gate_up", dtype)
            print(f"{dtype_name} {name:8s} N={N:6d} K={K:6d}  " + "  ".join(
                f"{tile} {v['us']:5.1f} us ({v['GB_s']:4.0f} GB/s, err {v['rel_err']:.0e})" for tile, v in r.items()),
                flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
