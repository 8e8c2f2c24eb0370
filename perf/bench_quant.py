"""Quantized inference on the GPU in one run: kernel correctness (bf16), kernel timings, and engine decode speed of
each quantization against bf16 measured in the same run, on a random-weight Llama-3-8B shape.

    python3 perf/bench_quant.py --out bench_quant.json            # ~3-4 minutes on an H100

1. kernels: W8A16, W4A16 (group 128), FP8 and INT8 W8A8 products on the 8B projection shapes at M = 1, 16, 256,
   512, 2048 (W8A16 from 256 rows also by each of its two paths, tiled and dequantize + cuBLAS), each checked
   against its dequantize-then-matmul reference (bf16 inputs) and timed against bf16 F.linear (cuBLAS) and, for
   FP8, torch._scaled_mm with row-wise scales; quantized-KV attention (int8, fp8) checked and timed against the
   bf16-cache kernel.
2. engine: batch-1 (and batch-64) decode tok/s of bf16, int8_wo, int4_wo, fp8, int8_sq (dummy weights
   quantized in place by round-to-nearest; CUDA graphs on), the same with the LM head quantized too
   ("+head": `--quant-lm-head`), and batch-64 decode with an int8 KV cache.
Prints a table last; writes everything to --out as JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.config import EngineConfig  # noqa: E402
from backend.engine.engine import LLMEngine  # noqa: E402
from backend.engine.quantization import QuantConfig  # noqa: E402
from backend.engine.quantization import rtn  # noqa: E402
from backend.kernels import _pdl  # noqa: E402
from backend.kernels import kv_quant as kq  # noqa: E402
from backend.kernels import quant_matmul as qm  # noqa: E402
from backend.kernels import scaled_matmul as sm  # noqa: E402
from perf.bench_engine import (SHAPES, ceilings, decode_rate, greedy, random_prompts, run_all,  # noqa: E402
                               weight_bytes_per_step)

# (name, N, K) of the Llama-3-8B projections
LINEARS = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
ROWS = (1, 16, 256, 512, 2048)
NO_PDL = " (no PDL)"  # suffix of the engine runs made without programmatic dependent launch
ENGINE_RUNS = [("bf16", None, (1, 64)), ("int8_wo", None, (1, 64)), ("int8_wo+head", None, (1,)),
               ("int4_wo", None, (1, 64)), ("int4_wo+head", None, (1,)), ("int4_wo+head@32", None, (1,)),
               ("fp8", None, (1, 64)),
               ("fp8+head", None, (1, 64)), ("int8_sq", None, (64,)), ("bf16", "int8", (64,))]


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=30)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12))


def kernel_rows(N: int, K: int, M: int) -> dict:
    """One projection shape: errors and times of every quantized product against bf16."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * 0.02
    wb = w.bfloat16()
    q8, s8 = rtn.quantize_int8(w)
    q4, s4, z4 = rtn.quantize_int4(w, 128)
    p4 = qm.pack_int4(q4)
    w4 = qm.to_planar_int4(p4, 128)  # the kernels' layout (the engine repacks at load)
    f8, fs = rtn.quantize_fp8(w)
    out = {"bf16_us": 1e3 * bench_ms(lambda: torch.nn.functional.linear(x, wb))}
    cases = {
        "w8a16": (lambda: qm.w8a16_matmul_triton(x, q8, s8), lambda: qm.w8a16_matmul_ref(x.float(), q8, s8)),
        "w4a16": (lambda: qm.w4a16_matmul_triton(x, w4, s4, z4, 128),
                  lambda: qm.w4a16_matmul_ref(x.float(), p4, s4, z4, 128)),
        "fp8": (lambda: sm.w8a8_linear_triton(x, f8, fs, "fp8"), lambda: sm.w8a8_linear_ref(x.float(), f8, fs, "fp8")),
        "int8_w8a8": (lambda: sm.w8a8_linear_triton(x, q8, s8, "int8"),
                      lambda: sm.w8a8_linear_ref(x.float(), q8, s8, "int8")),
    }
    if M >= 256:  # both W8A16 paths around qm.W8_DEQUANT_MIN_M (the default above picks one of them)
        w8_ref = cases["w8a16"][1]
        cases["w8a16_tiled"] = (lambda: qm.w8a16_matmul_triton(x, q8, s8, path="tiled"), w8_ref)
        cases["w8a16_dequant"] = (lambda: qm.w8a16_matmul_triton(x, q8, s8, path="dequant"), w8_ref)
    for name, (kernel, ref) in cases.items():
        out[f"{name}_rel_err"] = rel_err(kernel(), ref())
        out[f"{name}_us"] = 1e3 * bench_ms(kernel)
    out["fp8_scaled_mm_us"] = _scaled_mm_us(x, f8, fs)
    return out


def _scaled_mm_us(x, f8, fs) -> float | None:
    try:
        def run():
            xq, xs = sm.quantize_per_token_triton(x, "fp8")
            return torch._scaled_mm(xq, f8.T, scale_a=xs[:, None], scale_b=fs[None, :], out_dtype=torch.bfloat16)
        run()
        return 1e3 * bench_ms(run)
    except Exception:  # row-wise scaling needs a recent torch / cuBLASLt; the table just shows none
        return None


def kv_attention_rows() -> dict:
    from tests.kernels.test_paged_attention import make_batch
    from backend.kernels.paged_attention import paged_attention_triton

    out = {}
    seqs = [(2048, 1)] * 64
    cache, meta = make_batch(seqs, 8, 128, 16, torch.bfloat16, torch.device("cuda"))
    q = torch.randn(64, 32, 128, device="cuda", dtype=torch.bfloat16)
    out["bf16_cache_us"] = 1e3 * bench_ms(lambda: paged_attention_triton(q, cache, meta, 128 ** -0.5))
    for kind in kq.KV_DTYPES:
        qcache = kq.quantize_cache_ref(cache, kind)
        got = kq.paged_attention_quant_triton(q, qcache, meta, 128 ** -0.5)
        want = kq.paged_attention_quant_ref(q.float(), qcache, meta, 128 ** -0.5)
        out[f"{kind}_rel_err"] = rel_err(got, want)
        out[f"{kind}_cache_us"] = 1e3 * bench_ms(lambda: kq.paged_attention_quant_triton(q, qcache, meta, 128 ** -0.5))
    return out


def kernels() -> dict:
    results = {}
    for name, N, K in LINEARS:
        for M in ROWS:
            results[f"{name}_M{M}"] = kernel_rows(N, K, M)
    results["kv_attention_b64_ctx2048"] = kv_attention_rows()
    return results


def write_config(folder: str, mode: str | None) -> str:
    """config.json of the 8B shape; mode: a quantization method, "+head" for its LM head quantized too."""
    config = dict(SHAPES["llama3-8b"], architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                  max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    if mode:
        mode, _, group = mode.partition("@")  # int4_wo@32: INT4 groups of 32
        method, _, head = mode.partition("+")
        config["quantization_config"] = QuantConfig.for_method(method, int(group or 128),
                                                               lm_head=head == "head").to_json()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def engine_run(method: str, kv: str | None, batches: tuple[int, ...], pdl: bool = True) -> dict:
    _pdl.set_enabled(pdl)  # read at each launch, so the CUDA graphs captured below keep this setting
    with tempfile.TemporaryDirectory() as folder:
        write_config(folder, None if method == "bf16" else method)
        start = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=folder, load_format="dummy", dtype="bfloat16", max_num_seqs=64,
                                        max_num_batched_tokens=8192, max_model_len=2048,
                                        gpu_memory_utilization=0.85, kv_cache_dtype=kv or "auto"))
        out = {"load_and_warmup_s": time.perf_counter() - start, "kv_blocks": engine.runner.num_blocks,
               "weight_GB": sum(p.numel() * p.element_size() for p in engine.runner.model.parameters()) / 1e9}
        if method == "bf16":
            out["weight_GB_per_step"] = weight_bytes_per_step(engine) / 1e9
        vocab = engine.model_config.vocab_size
        run_all(engine, random_prompts(2, 64, 64, vocab), greedy(8))
        for batch in batches:  # best of 3: a 3 ms batch-1 step shows the host's hiccups in single runs
            rates = [decode_rate(engine, batch, vocab) for _ in range(3)]
            out[f"decode_b{batch}_tok_s"], out[f"runs_b{batch}_tok_s"] = max(rates), rates
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def profile_run(method: str, batch: int, steps: int = 16) -> dict:
    """GPU time per kernel and step over `steps` decode steps at `batch` (CUDA graphs on), for one mode."""
    from perf.bench_engine import kernel_table, prefill_pending

    with tempfile.TemporaryDirectory() as folder:
        write_config(folder, None if method == "bf16" else method)
        engine = LLMEngine(EngineConfig(model=folder, load_format="dummy", dtype="bfloat16", max_num_seqs=64,
                                        max_num_batched_tokens=8192, max_model_len=2048, gpu_memory_utilization=0.85))
        vocab = engine.model_config.vocab_size
        for i, prompt in enumerate(random_prompts(batch, 128, 128, vocab, seed=batch)):
            engine.add_request(f"p{i}", prompt, greedy(steps + 16))
        while prefill_pending(engine):
            engine.step()
        for _ in range(4):
            engine.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        wall_us = 1e6 * (time.perf_counter() - start) / steps
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return dict(kernel_table(prof, steps, top=20), wall_us_per_step=wall_us)


def speedups(engine: dict) -> dict:
    """Each mode against bf16 run with the same PDL setting (keys ending in NO_PDL were run without it)."""
    table = {}
    for key, res in engine.items():
        base = engine.get("bf16" + NO_PDL if key.endswith(NO_PDL) else "bf16", {})
        for metric, value in res.items():
            if metric.startswith("decode_") and metric in base and res is not base:
                table[f"{key} {metric}"] = value / base[metric]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_quant.json")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--engine-modes", default="", help="only these engine runs, e.g. bf16,int8_wo,int8_wo+head "
                                                           "(names as in the table; default: all)")
    parser.add_argument("--profile", default="", help="e.g. bf16:64,fp8:64: GPU time per kernel in decode steps "
                                                      "of those modes at those batch sizes (instead of the engine runs)")
    parser.add_argument("--pdl", choices=("on", "off", "both"), default="on",
                        help="programmatic dependent launch in the engine runs (backend/kernels/_pdl.py); both: "
                             "each mode also without it, keys ending in " + NO_PDL.strip())
    args = parser.parse_args()
    if args.profile:
        results = {"device": torch.cuda.get_device_name(), "profiles": {}}
        for item in args.profile.split(","):
            method, batch = item.split(":")
            table = results["profiles"][item] = profile_run(method, int(batch))
            print(f"{item}: GPU {table['gpu_us_per_step']:.0f} us per step, wall {table['wall_us_per_step']:.0f}")
            for name, k in list(table["kernels"].items())[:14]:
                print(f"    {k['us_per_step']:8.1f} us  x{k['calls_per_step']:5.1f}  {name[:80]}")
        _dump(results, args.out)
        return
    results = {"device": torch.cuda.get_device_name(), "ceilings": ceilings(), "engine": {}}
    if not args.skip_kernels:
        results["kernels"] = kernels()
        _dump(results, args.out)
    if not args.skip_engine:
        for method, kv, batches in ENGINE_RUNS:
            key = method + (f"+kv_{kv}" if kv else "")
            if args.engine_modes and key not in args.engine_modes.split(","):
                continue
            for pdl in {"on": (True,), "off": (False,), "both": (False, True)}[args.pdl]:
                label = key if pdl else key + NO_PDL
                try:
                    results["engine"][label] = engine_run(method, kv, batches, pdl)
                except Exception as exc:  # record and go on: one failing mode must not lose the others
                    results["engine"][label] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                _dump(results, args.out)
        results["speedup_vs_bf16"] = speedups({k: v for k, v in results["engine"].items() if "error" not in v})
        bf16 = results["engine"].get("bf16", {})
        if "decode_b1_tok_s" in bf16:  # batch-1 bf16 against the roofline measured in this run
            roofline = results["ceilings"]["copy_GBps"] / bf16["weight_GB_per_step"]
            bf16["decode_b1_fraction_of_roofline"] = bf16["decode_b1_tok_s"] / roofline
        _dump(results, args.out)
    print_table(results)


def _dump(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def print_table(results: dict) -> None:
    print(f"\n{results['device']}")
    for shape, row in results.get("kernels", {}).items():
        cells = "  ".join(f"{k}={v:.3g}" for k, v in row.items() if v is not None)
        print(f"  {shape:24s} {cells}")
    for key, res in results["engine"].items():
        cells = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={[round(x, 1) for x in v]}"
                          if isinstance(v, list) else f"{k}={v}" for k, v in res.items())
        print(f"  engine {key:16s} {cells}")
    for key, value in results.get("speedup_vs_bf16", {}).items():
        print(f"  speedup {key:36s} {value:6.2f}x")


if __name__ == "__main__":
    main()
