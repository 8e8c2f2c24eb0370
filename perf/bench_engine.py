"""Offline engine benchmark on random-weight models of real shapes, with transformers as the baseline.

    python3 perf/bench_engine.py --shapes llama3-8b --out results.json        # on the GPU machine

Reports in one run: measured copy bandwidth and bf16 matmul rate (the ceilings), then per shape: batch-1
decode tok/s and its fraction of the roofline (weight bytes read per step / copy bandwidth), decode tok/s
at batch 16/64/256, prefill tok/s at 2k tokens (and its fraction of the matmul rate), the mixed workload
(256 requests, prompts 64-512 tokens, 128 new tokens), 64 requests sharing a 1,024-token prefix with and
without prefix caching, and the same workloads on transformers (eager generate; generate_batch).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.config import EngineConfig  # noqa: E402
from backend.engine.engine import LLMEngine  # noqa: E402
from backend.engine.sampling_params import SamplingParams  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    # for CPU runs of the serving path and smoke tests of the GPU scripts
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=256, vocab_size=1000, rope_theta=10000.0, tie_word_embeddings=False),
}
NEW_TOKENS = 128


def write_config(shape: str, folder: str) -> str:
    config = dict(SHAPES[shape], architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                  max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def ceilings() -> dict:
    import triton.testing

    src = torch.randn(2**28, device="cuda")  # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    copy_s = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_s = triton.testing.do_bench(lambda: a @ b, return_mode="median") / 1e3
    return {"copy_GBps": 2 * src.numel() * 4 / copy_s / 1e9, "matmul_TFLOPs": 2 * 8192**3 / mm_s / 1e12}


def random_prompts(n: int, low: int, high: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=gen).tolist()
    return [torch.randint(10, vocab, (length,), generator=gen).tolist() for length in lengths]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, min_tokens=n)


def run_all(engine: LLMEngine, prompts, params) -> float:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", prompt, params)
    return timed(lambda: drain(engine))


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


def decode_rate(engine: LLMEngine, batch: int, vocab: int) -> float:
    """tok/s of decode steps alone: prefill everything first, then time the remaining steps."""
    for i, prompt in enumerate(random_prompts(batch, 128, 128, vocab, seed=batch)):
        engine.add_request(f"d{batch}-{i}", prompt, greedy(NEW_TOKENS))
    while prefill_pending(engine):
        engine.step()
    already = sum(r.num_output_tokens for r in engine.scheduler.running)
    return (batch * NEW_TOKENS - already) / timed(lambda: drain(engine))


def weight_bytes_per_step(engine: LLMEngine) -> int:
    """Every weight is read once per decode step except the input embedding, which is only gathered
    (when tied, the same table is read whole as the LM head, so it counts once)."""
    model = engine.runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.model.embed_tokens.weight
    tied = model.lm_head is None
    return total if tied else total - embedding.numel() * embedding.element_size()


def prefix_workload(engine: LLMEngine, vocab: int) -> float:
    prefix = random_prompts(1, 1024, 1024, vocab, seed=7)[0]
    suffixes = random_prompts(64, 16, 16, vocab, seed=8)
    first = run_all(engine, [prefix + [11] * 16], greedy(1))
    return first + run_all(engine, [prefix + s for s in suffixes], greedy(1))


def mixed_workload(engine: LLMEngine, vocab: int) -> float:
    """Output tok/s of 256 requests (prompts 64-512 tokens, 128 new) all arriving at once."""
    run_all(engine, random_prompts(32, 64, 512, vocab, seed=6), greedy(16))  # warm, other prompts
    mixed = random_prompts(256, 64, 512, vocab, seed=5)
    return 256 * NEW_TOKENS / run_all(engine, mixed, greedy(NEW_TOKENS))


def prefill_pending(engine: LLMEngine) -> bool:
    """True while a request waits or has prompt tokens not yet computed."""
    scheduler = engine.scheduler
    return bool(scheduler.num_waiting) or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running)


def mixed_phases(engine: LLMEngine, vocab: int, profile: bool = False) -> dict:
    """The mixed workload split in two: steps while some prompt is still being prefilled (chunks of new
    tokens beside the decodes of the requests already started), then the pure-decode steps to the end.
    Step times are host wall times of the asynchronous loop; over many steps they track the GPU. Prompts of
    another seed than the timed run's, so the prefix cache does not serve them. With `profile`, each phase
    also runs under torch.profiler and reports GPU time per kernel name (slower: time a run without it)."""
    mixed = random_prompts(256, 64, 512, vocab, seed=25 if profile else 15)
    for i, prompt in enumerate(mixed):
        engine.add_request(f"ph{i}-{profile}", prompt, greedy(NEW_TOKENS))
    out: dict = {}

    def phase(name: str, running) -> None:
        steps = 0
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile \
                else contextlib.nullcontext() as prof:
            while running():
                engine.step()
                steps += 1
            torch.cuda.synchronize()
        out[f"{name}_phase_s"], out[f"{name}_phase_steps"] = time.perf_counter() - start, steps
        if profile:
            out[f"{name}_kernels"] = kernel_table(prof, steps)

    phase("prefill", lambda: prefill_pending(engine))
    out["output_tokens_in_prefill_phase"] = sum(r.num_output_tokens for r in engine.scheduler.running)
    phase("decode", engine.has_unfinished)
    out["decode_ms_per_step"] = 1e3 * out["decode_phase_s"] / max(1, out["decode_phase_steps"])
    return out


def kernel_table(prof, steps: int, top: int = 25) -> dict:
    """GPU microseconds per step for each kernel name, largest first, with the total."""
    kernels = {e.key[:100]: {"us_per_step": e.device_time_total / steps, "calls_per_step": e.count / steps}
               for e in prof.key_averages() if e.device_time_total > 0}
    ordered = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_step"])[:top])
    return {"gpu_us_per_step": sum(k["us_per_step"] for k in kernels.values()), "kernels": ordered}


def bench_ours(shape: str, folder: str, ceil: dict, out: dict, mixed_only: bool = False,
               batched_tokens: int = 8192, profile: bool = False) -> None:
    def make(**kw):
        settings = dict(model=folder, load_format="dummy", dtype="bfloat16", max_num_seqs=256,
                        max_num_batched_tokens=batched_tokens, max_model_len=4096, gpu_memory_utilization=0.85)
        settings.update(kw)
        return LLMEngine(EngineConfig(**settings))

    start = time.perf_counter()
    engine = make()
    out["load_and_warmup_s"] = time.perf_counter() - start
    out["warmup_s"] = engine.runner.warmup_seconds
    vocab = engine.model_config.vocab_size
    out["weight_GB_per_step"] = weight_bytes_per_step(engine) / 1e9
    out["roofline_tok_s"] = ceil["copy_GBps"] / out["weight_GB_per_step"]
    run_all(engine, random_prompts(4, 64, 64, vocab), greedy(8))  # warm the allocator and cuBLAS
    if mixed_only:
        out["mixed_256_output_tok_s"] = mixed_workload(engine, vocab)
        if profile:
            out["mixed_phases"] = mixed_phases(engine, vocab)
            out["mixed_phases_profiled"] = mixed_phases(engine, vocab, profile=True)
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()  # the next engine (another --batched-tokens) sizes its KV cache from free memory
        return
    for batch in (1, 16, 64, 256):
        out[f"decode_b{batch}_tok_s"] = decode_rate(engine, batch, vocab)
    out["decode_b1_fraction_of_roofline"] = out["decode_b1_tok_s"] / out["roofline_tok_s"]
    prefill_s = statistics.median(run_all(engine, random_prompts(1, 2048, 2048, vocab, seed=s), greedy(1))
                                  for s in (3, 4, 5))
    out["prefill_2k_tok_s"] = 2048 / prefill_s
    flops = 2 * out["weight_GB_per_step"] / 2 * 1e9 * 2048  # 2 FLOP per bf16 weight per token (matmuls only)
    out["prefill_2k_fraction_of_matmul"] = flops / prefill_s / 1e12 / ceil["matmul_TFLOPs"]
    out["mixed_256_output_tok_s"] = mixed_workload(engine, vocab)
    out["prefix_cached_s"] = prefix_workload(engine, vocab)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    engine = make(enable_prefix_caching=False)
    out["prefix_uncached_s"] = prefix_workload(engine, vocab)
    out["prefix_speedup"] = out["prefix_uncached_s"] / out["prefix_cached_s"]
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def bench_transformers(folder: str, out: dict, full: bool) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    vocab = config.vocab_size

    def eager(batch: int) -> float:
        ids = torch.tensor(random_prompts(batch, 128, 128, vocab, seed=batch), device="cuda")
        gen = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
        return batch * NEW_TOKENS / timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **gen))

    out["hf_eager_b1_tok_s"] = eager(1)
    if not full:
        return
    out["hf_eager_b16_tok_s"] = eager(16)
    out["hf_eager_b64_tok_s"] = eager(64)
    try:
        model.set_attn_implementation("paged|sdpa")
        mixed = random_prompts(256, 64, 512, vocab, seed=5)
        gen = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=-1, pad_token_id=0)
        elapsed = timed(lambda: model.generate_batch(inputs=mixed, generation_config=gen))
        out["hf_generate_batch_mixed_tok_s"] = 256 * NEW_TOKENS / elapsed
    except Exception as exc:  # record, don't hide: the baseline's API moves between versions
        out["hf_generate_batch_error"] = f"{type(exc).__name__}: {exc}"[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="llama3-8b,llama3.2-1b")
    parser.add_argument("--out", default="bench_engine.json")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--mixed-only", action="store_true", help="only our mixed workload (no baselines)")
    parser.add_argument("--batched-tokens", default="8192",
                        help="max_num_batched_tokens; with --mixed-only a comma-separated list runs the mixed "
                             "workload once per value (mixed_256_output_tok_s_<value> beyond the first)")
    parser.add_argument("--profile", action="store_true",
                        help="with --mixed-only: also time the mixed run's prefill and decode phases apart, then "
                             "once more under torch.profiler for GPU time per kernel and step in each phase")
    args = parser.parse_args()
    token_budgets = [int(v) for v in args.batched_tokens.split(",")]
    results = {"device": torch.cuda.get_device_name(), "ceilings": ceilings(), "shapes": {}}
    for i, shape in enumerate(args.shapes.split(",")):
        out = results["shapes"].setdefault(shape, {})
        with tempfile.TemporaryDirectory() as folder:
            write_config(shape, folder)
            bench_ours(shape, folder, results["ceilings"], out, args.mixed_only, token_budgets[0], args.profile)
            for budget in token_budgets[1:] if args.mixed_only else []:
                extra: dict = {}
                bench_ours(shape, folder, results["ceilings"], extra, True, budget)
                out[f"mixed_256_output_tok_s_{budget}"] = extra["mixed_256_output_tok_s"]
            if not (args.skip_transformers or args.mixed_only):
                bench_transformers(folder, out, full=(i == 0))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\ndevice {results['device']}: copy {results['ceilings']['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {results['ceilings']['matmul_TFLOPs']:.0f} TFLOP/s")
    for shape, out in results["shapes"].items():
        print(f"\n{shape}")
        for key, value in out.items():
            if key == "mixed_phases_profiled":
                for phase in ("prefill", "decode"):
                    table = value[f"{phase}_kernels"]
                    print(f"  {phase} phase under the profiler: {value[f'{phase}_phase_steps']} steps, GPU "
                          f"{table['gpu_us_per_step']:.0f} us per step")
                    for name, k in list(table["kernels"].items())[:12]:
                        print(f"    {k['us_per_step']:9.1f} us  x{k['calls_per_step']:5.1f}  {name[:80]}")
                continue
            print(f"  {key:36s} {value:12.3f}" if isinstance(value, float) else f"  {key:36s} {value}")


if __name__ == "__main__":
    main()
