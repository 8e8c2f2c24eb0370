"""What serving costs: the mixed workload offline and then through a real tritonserver, in one run.

    .venv/bin/python -m perf.serving_overhead                       # CPU, tiny random model (about 2 minutes)
    python3 -m perf.serving_overhead --device cuda --shape llama3-8b --requests 256 --new-tokens 128

On CPU the tiny model makes engine steps cheap, so what the server adds per response (the Python stub's
threads, its IPC to tritonserver, gRPC) shows up as the gap between the two figures, without a GPU. Prints
both output tok/s and their ratio; --out writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.config import EngineConfig  # noqa: E402
from backend.engine.engine import LLMEngine  # noqa: E402
from perf import load_mixed  # noqa: E402
from perf.bench_engine import SHAPES, greedy, random_prompts, write_config  # noqa: E402
from perf.make_bench_checkpoint import write_tokenizer  # noqa: E402

SEED = 5  # load_mixed's default prompts


def engine_settings(args) -> dict:
    settings = dict(load_format="dummy", max_num_seqs=args.requests, max_num_batched_tokens=8192,
                    max_model_len=2048, device=args.device)
    if args.device == "cpu":
        settings.update(dtype="float32", kv_cache_memory_mb=1024)
    else:
        settings.update(dtype="bfloat16", gpu_memory_utilization=0.85)
    return settings


def offline(folder: str, args) -> float:
    engine = LLMEngine(EngineConfig(model=folder, **engine_settings(args)))
    vocab = SHAPES[args.shape]["vocab_size"]
    engine.generate(random_prompts(8, 64, 128, vocab, seed=6), greedy(8))  # warm
    prompts = random_prompts(args.requests, 64, 512, vocab, seed=SEED)
    start = time.perf_counter()
    engine.generate(prompts, greedy(args.new_tokens))
    elapsed = time.perf_counter() - start
    engine.shutdown()
    return args.requests * args.new_tokens / elapsed


def served(folder: str, args, work: str, responder_threads: int) -> dict:
    from tools.generate_repo import main as generate_repo
    from tools.serve import TritonServer

    repo = os.path.join(work, f"repo-{responder_threads}")
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in engine_settings(args).items()]
    generate_repo(["--output-dir", repo, "--model", folder, "--quiet", *flags,
                   "--responder-threads", str(responder_threads)])
    with TritonServer(repo, http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2) as server:
        server.wait_ready(timeout=300)
        common = ["--url", server.grpc_url, "--vocab", str(SHAPES[args.shape]["vocab_size"]), "--timeout", "600"]
        load_mixed.run(load_mixed.parse_args([*common, "--requests", "8", "--new-tokens", "8", "--seed", "6"]))
        return load_mixed.run(load_mixed.parse_args(
            [*common, "--requests", str(args.requests), "--new-tokens", str(args.new_tokens), "--seed", str(SEED)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--responder-threads", default="4",
                        help="comma-separated: one server run per value (e.g. 1,4 compares them)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    thread_counts = [int(x) for x in args.responder_threads.split(",")]
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, "checkpoint")
        os.makedirs(folder)
        write_config(args.shape, folder)
        write_tokenizer(SHAPES[args.shape]["vocab_size"], folder)
        result = {"device": args.device, "shape": args.shape, "requests": args.requests,
                  "new_tokens": args.new_tokens, "offline_output_tok_s": offline(folder, args), "served": {}}
        for threads in thread_counts:
            server = served(folder, args, work, threads)
            result["served"][threads] = dict(
                output_tok_s=server["output_tok_s"], all_finished=server["all_finished"],
                ttft_p50_s=server["ttft_p50_s"], errors=server["errors"],
                over_offline=server["output_tok_s"] / result["offline_output_tok_s"])
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    served_ok = all(s["all_finished"] and not s["errors"] for s in result["served"].values())
    return 0 if served_ok else 1


if __name__ == "__main__":
    sys.exit(main())
