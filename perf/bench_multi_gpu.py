"""Multi-GPU benchmarks and checks (issue #6); perf/gpu_multi.sh runs every part on a 4-GPU machine.

    python3 perf/bench_multi_gpu.py equality --tp 1,2,4 --out eq.json         # greedy TP2/TP4 == TP1 (fp32)
    python3 perf/bench_multi_gpu.py decode --tp 2 --out tp2.json                # batch-1 decode tok/s, 8B shape
    python3 perf/bench_multi_gpu.py mixed --device-ids 0 --part 0/1 --out r.json  # mixed workload (share)
    python3 perf/bench_multi_gpu.py allreduce --tp 2 --out ar.json              # all-reduce latency in graphs
    python3 perf/bench_multi_gpu.py dead-worker --tp 2 --out dw.json            # a worker killed mid-decode
    python3 perf/bench_multi_gpu.py ... --cpu-smoke                             # tiny shapes on CPU with gloo

--custom-all-reduce on|off (equality, decode): EngineConfig.custom_all_reduce, the symmetric-memory all-reduce
for small messages (backend/engine/parallel/custom_all_reduce.py) or NCCL only; the JSON records the path taken.

`mixed --part i/n` runs every n-th request of perf/bench_engine.py's mixed workload (256 requests, prompts
64-512 tokens, 128 new tokens) starting at i; with --barrier DIR the n processes start timing together
after all have loaded, and each records wall-clock start/end so that the parent can sum them up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.config import EngineConfig  # noqa: E402
from backend.engine.engine import LLMEngine  # noqa: E402
from backend.engine.sampling_params import SamplingParams  # noqa: E402
from perf.bench_engine import NEW_TOKENS, SHAPES, random_prompts, write_config  # noqa: E402

BARRIER_TIMEOUT_S = 300
EQUALITY_TIMEOUT_S = 100  # one tiny tensor-parallel engine: start, 6 prompts x 32 tokens, stop


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True)


def make_engine(folder: str, device: str, **settings) -> LLMEngine:
    base = dict(model=folder, device=device, load_format="dummy", dtype="bfloat16" if device == "cuda" else "float32",
                max_model_len=4096, gpu_memory_utilization=0.85)
    if device == "cpu":
        base.update(kv_cache_memory_mb=64, max_model_len=1024)
    return LLMEngine(EngineConfig(**{**base, **settings}))


def record_all_reduce_path(engine: LLMEngine, out: dict) -> None:
    group = getattr(engine.runner, "parallel", None)
    out["all_reduce_path"] = group.all_reduce_path if group is not None else "none (tp=1)"
    out["all_reduce_note"] = group.all_reduce_note if group is not None else ""


def with_graph_fallback(make, out: dict) -> LLMEngine:
    """CUDA graphs with NCCL collectives inside are the plan; if capture fails on this stack, record why and
    measure without graphs rather than lose the run."""
    try:
        return make(use_cuda_graphs=True)
    except Exception as exc:
        out["cuda_graphs_error"] = f"{type(exc).__name__}: {exc}"[:400]
        print(f"CUDA graphs failed, retrying without: {out['cuda_graphs_error']}", flush=True)
        return make(use_cuda_graphs=False)


# ---- greedy equality of TP ranks on a tiny real checkpoint -----------------------------------------------------

def equality(args, out: dict) -> None:
    """Same fp32 weights (a safetensors checkpoint), greedy: every tp must give tp=1's tokens exactly. Each size
    runs in its own process: a process holds one torch.distributed group, and NCCL's teardown of the previous
    engine's group can outlast the next engine's start (seen on 4xH200: TP4 refused after TP2)."""
    tps = [int(t) for t in args.tp.split(",")]
    if len(tps) == 1:
        record = out.setdefault(f"tp{tps[0]}", {})
        record["tokens"] = generate_tiny(args, tps[0], record)
        return
    results = {tp: equality_subprocess(args, tp, out) for tp in tps}
    base = results[min(results)]
    for tp, tokens in results.items():
        out[f"tp{tp}"]["equal_to_tp1"] = tokens is not None and tokens == base
        out[f"tp{tp}"]["first_mismatch"] = None if tokens is None else next(
            ([i, j] for i, (a, b) in enumerate(zip(base, tokens)) for j in range(len(a)) if a[j] != b[j]), None)


def equality_subprocess(args, tp: int, out: dict) -> list | None:
    path = f"{args.out}.tp{tp}.json"
    command = [sys.executable, os.path.abspath(__file__), "equality", "--tp", str(tp), "--out", path]
    start = time.perf_counter()
    command += ["--custom-all-reduce", args.custom_all_reduce] + (["--cpu-smoke"] if args.cpu_smoke else [])
    proc = subprocess.run(command, capture_output=True, text=True, timeout=EQUALITY_TIMEOUT_S)
    try:
        with open(path) as f:
            child = json.load(f)
    except (OSError, ValueError):
        child = {"error": f"exit {proc.returncode}: {proc.stderr[-400:]}"}
    record = out[f"tp{tp}"] = {k: v for k, v in child.get(f"tp{tp}", {}).items() if k != "tokens"}
    record["seconds"] = time.perf_counter() - start
    if "error" in child:
        record["error"] = child["error"]
    return child.get(f"tp{tp}", {}).get("tokens")


def generate_tiny(args, tp: int, record: dict) -> list[list[int]]:
    from tests.tiny_models import make_tiny_checkpoint

    folder = tempfile.mkdtemp(prefix="tp-eq-")
    make_tiny_checkpoint("llama", folder, num_attention_heads=8, num_key_value_heads=4, hidden_size=128,
                         intermediate_size=256, vocab_size=1000, seed=0)
    prompts = random_prompts(6, 5, 60, 1000, seed=1)

    def make(**kw):
        return LLMEngine(EngineConfig(model=folder, device=args.device, dtype="float32", kv_cache_memory_mb=64,
                                      max_num_seqs=8, tensor_parallel_size=tp,
                                      custom_all_reduce=args.custom_all_reduce == "on", **kw))

    engine = with_graph_fallback(make, record)
    record_all_reduce_path(engine, record)
    try:
        return engine.generate(prompts, greedy(32))
    finally:
        engine.shutdown()


def dead_worker(args, out: dict) -> None:
    """A TP engine on the tiny checkpoint (on the GPU: the fused all-reduce + RMSNorm path) loses a worker to
    SIGKILL in the middle of decoding: how long until a step raises WorkerDiedError, and how long the shutdown
    takes. The parent's exit time (this process's) shows whether a kernel left waiting for the dead peer holds
    the process up."""
    import signal

    from backend.engine.parallel.workers import WorkerDiedError

    folder = tempfile.mkdtemp(prefix="tp-dead-")
    from tests.tiny_models import make_tiny_checkpoint
    make_tiny_checkpoint("llama", folder, num_attention_heads=8, num_key_value_heads=4, hidden_size=128,
                         intermediate_size=256, vocab_size=1000, seed=0)
    engine = LLMEngine(EngineConfig(model=folder, device=args.device, dtype="float32", kv_cache_memory_mb=64,
                                    max_num_seqs=8, tensor_parallel_size=int(args.tp)))
    record_all_reduce_path(engine, out)
    engine.add_request("long", random_prompts(1, 8, 8, 1000, seed=1)[0], greedy(100_000))
    for _ in range(8):
        engine.step()
    os.kill(engine.runner.pool.pids[0], signal.SIGKILL)
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < 60:
            engine.step()
        out["failed_with"] = "nothing within 60 s"
    except WorkerDiedError as exc:
        out["failed_with"] = str(exc)[:200]
    out["seconds_to_fail"] = time.perf_counter() - start
    start = time.perf_counter()
    engine.shutdown()
    out["shutdown_s"] = time.perf_counter() - start


# ---- batch-1 decode on a real shape -------------------------------------------------------------------------

def decode(args, out: dict) -> None:
    with tempfile.TemporaryDirectory() as folder:
        write_config(args.shape, folder)
        start = time.perf_counter()
        engine = with_graph_fallback(lambda **kw: make_engine(
            folder, args.device, max_num_seqs=8, max_num_batched_tokens=4096, tensor_parallel_size=args.tp,
            custom_all_reduce=args.custom_all_reduce == "on", **kw), out)
        out["load_and_warmup_s"] = time.perf_counter() - start
        record_all_reduce_path(engine, out)
        try:
            vocab = engine.model_config.vocab_size
            engine.generate(random_prompts(2, 64, 64, vocab), greedy(8))  # allocator, cuBLAS, NCCL warm
            rates = [decode_b1(engine, vocab, seed) for seed in (1, 2, 3)]
            out["decode_b1_tok_s_runs"] = rates
            out["decode_b1_tok_s"] = max(rates)
            if args.profile:
                out["profile_rank0"] = profile_decode_b1(engine, vocab)
        finally:
            engine.shutdown()


def decode_b1(engine: LLMEngine, vocab: int, seed: int) -> float:
    """tok/s of the decode steps of one 128-token prompt generating NEW_TOKENS (prefill excluded)."""
    engine.add_request(f"d{seed}", random_prompts(1, 128, 128, vocab, seed=seed)[0], greedy(NEW_TOKENS))
    engine.step()  # prefill (+ with async scheduling, the first decode launched)
    done_before = sum(r.num_output_tokens for r in engine.scheduler.running)
    device = "cuda" if engine.runner.device.type == "cuda" else "cpu"
    sync(device)
    start = time.perf_counter()
    drain(engine)
    sync(device)
    return (NEW_TOKENS - done_before) / (time.perf_counter() - start)


def profile_decode_b1(engine: LLMEngine, vocab: int, steps: int = 32) -> dict:
    """Rank 0's GPU time per kernel over `steps` batch-1 decode steps, and the wall time per step (the gap is
    where the GPU waits: on the host, or on the other ranks inside an all-reduce)."""
    from perf.bench_engine import kernel_table

    engine.add_request("profiled", random_prompts(1, 128, 128, vocab, seed=9)[0], greedy(steps + 8))
    for _ in range(4):  # prefill and the first decodes
        engine.step()
    sync("cuda")
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync("cuda")
    wall_us = 1e6 * (time.perf_counter() - start) / steps
    drain(engine)
    return dict(kernel_table(prof, steps, top=30), wall_us_per_step=wall_us)


# ---- all-reduce latency inside CUDA graphs: NCCL vs symmetric memory -------------------------------------------

AR_SIZES = [(8 * 1024, "bfloat16"), (8 * 1024, "float32"), (64 * 1024, "bfloat16"), (256 * 1024, "bfloat16"),
            (1024 * 1024, "bfloat16"), (4 * 1024 * 1024, "bfloat16")]
AR_CHAIN = 64  # all-reduces per graph: one batch-1 decode step of the 8B shape has 64
AR_REPLAYS = 30


def allreduce(args, out: dict) -> None:
    """Parent: start --tp rank processes (tests/test_custom_all_reduce.py's launcher); rank 0's numbers."""
    from tests.test_custom_all_reduce import launch_ranks

    command = [sys.executable, os.path.abspath(__file__), "allreduce-rank"]
    results = launch_ranks(int(args.tp), ["--cpu-smoke"] if args.cpu_smoke else [], command=command, timeout_s=240)
    out.update({k: v for k, v in results[0].items() if k not in ("what", "device", "shape")})
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        out["error"] = " | ".join(e[-600:] for e in errors)


def allreduce_rank(args, out: dict) -> None:
    import torch.distributed as dist
    from backend.engine.parallel.group import join_group
    from backend.engine.parallel.worker import watch_parent

    watch_parent(os.getppid())  # the launcher's timeout ends the ranks too
    device = torch.device("cuda", args.rank) if args.device == "cuda" else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", args.port, args.world, is_master=False)
    group = join_group(args.rank, args.world, device, 120.0, store)
    out.update(all_reduce_path=group.all_reduce_path, all_reduce_note=group.all_reduce_note, rows=[])
    try:
        for nbytes, dtype_name in AR_SIZES:
            dtype = getattr(torch, dtype_name)
            x = torch.randn(nbytes // torch.tensor([], dtype=dtype).element_size(), device=device).to(dtype)
            row = {"bytes": nbytes, "dtype": dtype_name,
                   "nccl_us": time_chain(lambda t: dist.all_reduce(t, group=group.compute), x, device)}
            if group.custom is not None and group.custom.fits(x):
                from backend.engine.parallel.custom_all_reduce import algorithm

                row["algorithm"] = algorithm(nbytes, args.world)
                row["symm_mem_us"] = time_chain(group.custom.all_reduce_, x, device)
            out["rows"].append(row)
        out["gather_vocab"] = time_gather(group, device)
    finally:
        group.destroy()


def time_chain(op, x: torch.Tensor, device: torch.device, chain: int = AR_CHAIN) -> float:
    """Median microseconds per op of `chain` back-to-back ops replayed from one CUDA graph (eager on CPU)."""
    x = x.clone()
    op(x)  # eager first: NCCL's communicator, the symmetric buffer's rendezvous
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(chain):
            op(x)
        return (time.perf_counter() - start) / chain * 1e6
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(chain):
            x.mul_(0.5)  # keep the sums finite over the chain; a few us, the same in both paths
            op(x)
    times = []
    for _ in range(AR_REPLAYS):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / chain)
    return sorted(times)[len(times) // 2]


def time_gather(group, device: torch.device) -> dict:
    """Batch-1 logits gather of the 8B shape (128256-token vocabulary): NCCL all_gather vs sum into zeros."""
    from backend.engine.parallel.sharding import vocab_shard_size

    shard = vocab_shard_size(128256, group.world_size) if device.type == "cuda" else 500
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    local = torch.randn(1, shard, device=device).to(dtype)
    result = {"shard": shard, "dtype": str(dtype)}
    custom, group.custom = group.custom, None
    try:
        result["nccl_us"] = time_chain(lambda t: group.gather_vocab(t, 128256), local, device, chain=16)
    finally:
        group.custom = custom
    if custom is not None:
        result["symm_mem_us"] = time_chain(lambda t: group.gather_vocab(t, 128256), local, device, chain=16)
    return result


# ---- the mixed workload, or a share of it, for replicas ------------------------------------------------------

def mixed(args, out: dict) -> None:
    index, parts = (int(x) for x in args.part.split("/"))
    with tempfile.TemporaryDirectory() as folder:
        write_config(args.shape, folder)
        engine = make_engine(folder, args.device, max_num_seqs=256, max_num_batched_tokens=8192,
                             device_ids=args.device_ids)
        try:
            vocab = engine.model_config.vocab_size
            engine.generate(random_prompts(32, 64, 512, vocab, seed=6)[index::parts], greedy(16))  # warm
            prompts = random_prompts(args.requests, 64, 512, vocab, seed=5)[index::parts]
            wait_at_barrier(args.barrier, index, parts)
            out["start_wall"] = time.time()
            for i, prompt in enumerate(prompts):
                engine.add_request(f"m{i}", prompt, greedy(NEW_TOKENS))
            drain(engine)
            sync(args.device)
            out["end_wall"] = time.time()
            out["requests"] = len(prompts)
            out["output_tokens"] = len(prompts) * NEW_TOKENS
            out["output_tok_s"] = out["output_tokens"] / (out["end_wall"] - out["start_wall"])
        finally:
            engine.shutdown()


def wait_at_barrier(folder: str | None, index: int, parts: int) -> None:
    """File barrier across independent processes: each says ready, then waits for all."""
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, f"ready{index}"), "w").close()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while not all(os.path.exists(os.path.join(folder, f"ready{i}")) for i in range(parts)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {folder}: not all {parts} processes ready in {BARRIER_TIMEOUT_S} s")
        time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["equality", "decode", "mixed", "allreduce", "allreduce-rank", "dead-worker"])
    parser.add_argument("--tp", default="1", help="equality: a list (1,2,4); decode, allreduce: one size")
    parser.add_argument("--custom-all-reduce", default="on", choices=["on", "off"],
                        help="equality, decode: symmetric-memory all-reduce for small messages (on) or NCCL only")
    for name in ("--rank", "--world", "--port"):  # allreduce-rank: set by the allreduce parent
        parser.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device-ids", default="", help="mixed: the GPU of this replica")
    parser.add_argument("--part", default="0/1", help="mixed: run requests i, i+n, ... of the workload (i/n)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--barrier", default=None)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU, gloo: checks the plumbing")
    parser.add_argument("--profile", action="store_true",
                        help="decode: also profile rank 0 over 32 batch-1 steps (GPU time per kernel)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.device = "cpu" if args.cpu_smoke else "cuda"
    if args.cpu_smoke:
        args.shape, args.device_ids = "tiny", ""
        args.requests = min(args.requests, 16)
    if args.what == "decode":
        args.tp = int(args.tp)
    if args.what == "allreduce-rank" and args.device == "cuda":
        torch.cuda.set_device(args.rank)  # before anything touches CUDA: no context on another rank's GPU
    out = {"what": args.what, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "shape": args.shape}
    try:
        {"equality": equality, "decode": decode, "mixed": mixed, "allreduce": allreduce,
         "allreduce-rank": allreduce_rank, "dead-worker": dead_worker}[args.what](args, out)
    except Exception as exc:  # the JSON records the failure; the shell script reports it in its table
        out["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        raise
    finally:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
