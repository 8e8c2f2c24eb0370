"""Host time per engine step, GPU faked: schedule -> prepare_inputs -> (sampler) -> update_from_output.

256 requests, prompts 64-512 tokens, 128 output tokens each (the mixed workload's shape), block size 16.
Each phase is timed with perf_counter per step and reported as the median over decode-only steps, in ms.
The sampler runs on a 1,024-token vocabulary so its CPU argmax (GPU work on the real machine) stays out of
the way; its time is printed apart. `--cprofile` adds a cProfile listing (which inflates call-heavy code).
With async scheduling (EngineConfig.async_scheduling, the default) this host work runs while the GPU computes
the previous step, so it is off the critical path as long as it stays under the GPU's step time.

    python perf/profile_host_step.py [--cprofile] [--batch 256]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.block_manager import BlockManager  # noqa: E402
from backend.engine.model_runner import ModelRunner  # noqa: E402
from backend.engine.request import Request  # noqa: E402
from backend.engine.sampler import Sampler  # noqa: E402
from backend.engine.sampling_params import SamplingParams  # noqa: E402
from backend.engine.scheduler import Scheduler  # noqa: E402

PHASES = ("schedule", "prepare_inputs", "update_from_output", "sampler")


class HostOnlyRunner(ModelRunner):
    """prepare_inputs of the real runner, on the CPU, without loading a model."""

    def __init__(self):
        self.block_size = 16
        self.device = torch.device("cpu")


def make_scheduler(batch: int) -> Scheduler:
    sched = Scheduler(BlockManager(40000, 16, True), batch, 8192, 4096)
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        n = int(torch.randint(64, 513, (1,), generator=gen))
        prompt = torch.randint(10, 128000, (n,), generator=gen).tolist()
        params = SamplingParams(max_tokens=128, min_tokens=128, end_ids=[128001, 128009])
        sched.add_request(Request(str(i), prompt, params, seed=i))
    return sched


def run(batch: int) -> list[dict]:
    torch.set_num_threads(1)  # idle OpenMP workers of the CPU sampler would spin on the cores timed here
    sched, runner, sampler = make_scheduler(batch), HostOnlyRunner(), Sampler()
    logits = torch.randn(batch, 1024)
    steps = []
    while sched.has_unfinished():
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        runner.prepare_inputs(out)
        t2 = time.perf_counter()
        sampling = [c for c in out.chunks if c.samples]
        sampled = sampler(logits[:len(sampling)], [c.request for c in sampling], [c.output_index for c in sampling])
        t3 = time.perf_counter()
        sched.update_from_output(out, sampled)
        t4 = time.perf_counter()
        steps.append({"decode": out.num_batched_tokens == len(out.chunks), "batch": len(out.chunks),
                      "schedule": t1 - t0, "prepare_inputs": t2 - t1, "sampler": t3 - t2,
                      "update_from_output": t4 - t3})
    return steps


def report(steps: list[dict], batch: int) -> None:
    decode = [s for s in steps if s["decode"] and s["batch"] == batch]
    print(f"steps {len(steps)}, decode steps at batch {batch}: {len(decode)}")
    medians = {p: statistics.median(s[p] for s in decode) * 1e3 for p in PHASES}
    for phase in PHASES:
        print(f"  {phase:<20} {medians[phase]:7.3f} ms")
    host = sum(medians[p] for p in PHASES[:3])
    print(f"  host (schedule + prepare + update) {host:.3f} ms per decode step; sampler apart")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()
    if not args.cprofile:
        report(run(args.batch), args.batch)
        return
    profiler = cProfile.Profile()
    steps = profiler.runcall(run, args.batch)
    report(steps, args.batch)
    pstats.Stats(profiler).sort_stats("cumtime").print_stats(25)


if __name__ == "__main__":
    main()
