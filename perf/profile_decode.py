"""Where a batch-1 decode step's GPU time goes, and how fast each projection's GEMV streams its weight.

    python3 perf/profile_decode.py --shape llama3-8b --out $OUT/profile_decode.json     # on the GPU machine

1. For every projection shape of the model: cuBLAS (F.linear) against the Triton GEMV kernel over a small
   grid of tiles, as GB/s of weight read (CUDA-graph timing, so launch cost is excluded) and the best tile.
2. The engine at batch 1 (random weights, 128-token prompt), with cuBLAS and with the GEMV kernel: tok/s over
   64 steps, then a torch.profiler trace of 16 steps summed per kernel name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.config import EngineConfig  # noqa: E402
from backend.engine.engine import LLMEngine  # noqa: E402
from backend.engine.sampling_params import SamplingParams  # noqa: E402
from backend.kernels import gemv  # noqa: E402
from perf.bench_engine import SHAPES, ceilings, write_config  # noqa: E402

TILES = [(bn, bk, w) for bn in (4, 8, 16) for bk in (256, 512) for w in (4, 8)]


def projection_shapes(shape: str) -> dict[str, tuple[int, int]]:
    s = SHAPES[shape]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * head_dim, s["num_key_value_heads"] * head_dim
    return {"qkv": (q + 2 * kv, s["hidden_size"]), "o": (s["hidden_size"], q),
            "gate_up": (2 * s["intermediate_size"], s["hidden_size"]),
            "down": (s["hidden_size"], s["intermediate_size"]), "lm_head": (s["vocab_size"], s["hidden_size"])}


def gemv_table(shape: str) -> dict:
    import triton.testing

    table = {}
    for name, (n, k) in projection_shapes(shape).items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = gemv.gemv_ref(x, w).float()
        gbps = lambda fn: n * k * 2 / (triton.testing.do_bench_cudagraph(fn) / 1e3) / 1e9  # noqa: E731
        row = {"N": n, "K": k, "cublas_GBps": gbps(lambda: F.linear(x, w)), "tiles": {}}
        for tile in TILES:
            err = ((gemv.gemv_triton(x, w, tile).float() - ref).abs().max() / ref.abs().max()).item()
            row["tiles"][str(tile)] = {"GBps": gbps(lambda: gemv.gemv_triton(x, w, tile)), "max_rel_err": err}
        best = max(row["tiles"], key=lambda t: row["tiles"][t]["GBps"])
        row["best_tile"], row["best_GBps"] = best, row["tiles"][best]["GBps"]
        table[name] = row
        del w
    return table


def batch1_engine(folder: str, use_gemv: bool) -> dict:
    engine = LLMEngine(EngineConfig(model=folder, load_format="dummy", dtype="bfloat16", max_num_seqs=16,
                                    max_model_len=4096, gpu_memory_utilization=0.85, decode_gemv=use_gemv))
    prompt = torch.randint(10, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("p", prompt, SamplingParams(max_tokens=400, min_tokens=400))
    for _ in range(8):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(64):
        engine.step()
    torch.cuda.synchronize()
    tok_s = 64 / (time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(16):
            engine.step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            kernels[event.key[:90]] = {"us_per_step": event.device_time_total / 16, "calls_per_step": event.count / 16}
    engine.abort_request("p")
    while engine.has_unfinished():
        engine.step()
    engine.shutdown()
    del engine
    torch.cuda.empty_cache()
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_step"]))
    return {"tok_s": tok_s, "gpu_us_per_step": sum(v["us_per_step"] for v in kernels.values()), "kernels": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--out", default="profile_decode.json")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "ceilings": ceilings(), "gemv": gemv_table(args.shape)}
    with tempfile.TemporaryDirectory() as folder:
        write_config(args.shape, folder)
        for label, flag in (("cublas", False), ("gemv", True)):
            result[f"engine_{label}"] = batch1_engine(folder, flag)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print_summary(result)


def print_summary(result: dict) -> None:
    print(f"copy {result['ceilings']['copy_GBps']:.0f} GB/s")
    for name, row in result["gemv"].items():
        print(f"  {name:8s} {row['N']:6d}x{row['K']:<6d} cuBLAS {row['cublas_GBps']:6.0f} GB/s   "
              f"triton best {row['best_GBps']:6.0f} GB/s {row['best_tile']}")
    for label in ("cublas", "gemv"):
        run = result[f"engine_{label}"]
        print(f"engine batch-1 [{label}]: {run['tok_s']:.1f} tok/s, GPU {run['gpu_us_per_step']:.0f} us/step")
        for name, k in list(run["kernels"].items())[:12]:
            print(f"    {k['us_per_step']:8.1f} us  x{k['calls_per_step']:5.1f}  {name}")


if __name__ == "__main__":
    main()
