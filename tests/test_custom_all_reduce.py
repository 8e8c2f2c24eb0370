"""The tensor-parallel all-reduce paths (backend/engine/parallel/custom_all_reduce.py).

CPU: which tensors may take the symmetric-memory path, the config switch, and two gloo ranks through
join_group (the fallback: dist.all_reduce, same sums). GPU (>= 2 GPUs, else skipped): two NCCL ranks whose
ParallelGroup.all_reduce_ (symmetric memory where it fits) must match dist.all_reduce over odd sizes, bf16 and
fp32, one-shot and two-shot sizes, eagerly and replayed from a CUDA graph, gather_vocab its NCCL gather, and
the fused all-reduce + RMSNorm its reference on the gathered partials (eagerly and in a graph).

Each rank is a process: `python -m tests.test_custom_all_reduce --rank R --world W --port P --out F ...`
(launch_ranks starts them; perf/bench_multi_gpu.py's `allreduce` microbenchmark reuses it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from backend.engine.config import EngineConfig
from backend.engine.errors import InvalidParameterError
from backend.engine.parallel import custom_all_reduce as car

REPO = Path(__file__).resolve().parents[1]
RANK_TIMEOUT_S = 240
# odd and aligned sizes around the decode message (4096 bf16 = 8 KB) and both algorithm boundaries
SIZES = [1, 7, 4095, 4096, 4100, 3 * 4096, 65_537, car.ONE_SHOT_MAX_BYTES // 2, car.ONE_SHOT_MAX_BYTES // 2 + 8,
         1_000_000, 3_000_001, 3_000_000]
TOLERANCES = {torch.bfloat16: (1.6e-2, 1e-2), torch.float32: (1e-6, 1e-6)}  # (rtol, atol)
GRAPH_SIZES = [4096, 3 * 4096 + 8, car.ONE_SHOT_MAX_BYTES // 2 + 8]  # one-shot, one-shot, two-shot (bf16)


# ---- CPU: eligibility and settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("tensor, reason", [
    (torch.zeros(4096, dtype=torch.bfloat16), None),
    (torch.zeros(3, 4096, dtype=torch.float32), None),
    (torch.zeros(4095, dtype=torch.bfloat16), "aligned"),
    (torch.zeros(4100, dtype=torch.bfloat16), "aligned"),  # 8200 bytes: 8-byte aligned only
    (torch.zeros(4097, dtype=torch.float32)[1:], "aligned"),  # a view 4 bytes into its storage
    (torch.zeros(64, 64, dtype=torch.float32).t(), "contiguous"),
    (torch.zeros(4096, dtype=torch.float16), "dtype"),
    (torch.zeros(4096, dtype=torch.int64), "dtype"),
    (torch.zeros(0, dtype=torch.float32), "empty"),
    (torch.zeros(car.BUFFER_BYTES // 4 + 4, dtype=torch.float32), "buffer"),
])
def test_which_tensors_take_the_symmetric_memory_path(tensor, reason):
    got = car.unsupported_reason(tensor)
    assert (got is None) if reason is None else (got is not None and reason in got), got


def test_one_shot_for_small_messages_two_shot_for_large():
    assert car.algorithm(8192, 2) == "one_shot"
    assert car.algorithm(car.ONE_SHOT_MAX_BYTES, 2) == "one_shot"
    assert car.algorithm(car.ONE_SHOT_MAX_BYTES + 16, 2) == "two_shot"
    assert car.algorithm(car.ONE_SHOT_MAX_BYTES + 16, 3) == "one_shot"  # no two-shot kernel for 3 ranks


def test_custom_all_reduce_setting_is_a_bool():
    assert EngineConfig().custom_all_reduce is True
    assert EngineConfig.from_dict({"custom_all_reduce": False}).custom_all_reduce is False
    with pytest.raises(InvalidParameterError, match="custom_all_reduce"):
        EngineConfig(custom_all_reduce="yes")


def test_generator_exposes_the_switch():
    from tools.generate_repo import build_parser

    args = build_parser().parse_args(["--output-dir", "x", "--no-custom-all-reduce"])
    assert args.custom_all_reduce is False


# ---- ranks ------------------------------------------------------------------------------------------------------

def launch_ranks(world: int, rank_args: list[str], command: list[str] | None = None,
                 timeout_s: float = RANK_TIMEOUT_S) -> list[dict]:
    """Start `world` rank processes on a store this process hosts; returns each rank's JSON (or its error)."""
    from backend.engine.parallel.group import host_store

    store = host_store(world, timeout_s)
    command = command or [sys.executable, "-m", "tests.test_custom_all_reduce"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="tp-ar-") as folder:
        outs = [os.path.join(folder, f"rank{r}.json") for r in range(world)]
        procs = [subprocess.Popen(command + ["--rank", str(r), "--world", str(world), "--port", str(store.port),
                                             "--out", outs[r]] + rank_args, env=env, cwd=str(REPO),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        logs = [_wait(p, timeout_s) for p in procs]
        return [_result(path, p.returncode, log) for path, p, log in zip(outs, procs, logs)]


def _wait(proc: subprocess.Popen, timeout_s: float) -> str:
    try:
        return proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0] + f"\n(killed after {timeout_s:.0f} s)"


def _result(path: str, code: int, log: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {}
    if code != 0 or not result:
        result["error"] = f"exit {code}: {log[-3000:]}"
    return result


def rank_check(group, device: torch.device) -> dict:
    """group.all_reduce_ (whatever path it picks per tensor) against dist.all_reduce, eagerly and in a graph."""
    checks = [_compare(group, device, numel, dtype) for dtype in TOLERANCES for numel in SIZES]
    checks.append(_compare(group, device, 4097, torch.float32, offset=1))  # a misaligned view: NCCL
    if device.type == "cuda":
        checks += [_compare_in_graph(group, device, numel) for numel in GRAPH_SIZES]
    checks += [_compare_gather(group, device, n, shard) for n, shard in ((1, 500), (1, 64128), (3, 256), (1, 77))]
    if device.type == "cuda":
        checks += [_compare_norm(group, device, rows, hidden, graph)
                   for rows, hidden, graph in ((1, 4096, False), (5, 4100, False), (car.NORM_MAX_ROWS, 4096, False),
                                               (car.NORM_MAX_ROWS + 1, 4096, False), (1, 4096, True), (3, 2048, True))]
    return {"path": group.all_reduce_path, "note": group.all_reduce_note, "checks": checks,
            "ok": all(c["ok"] for c in checks)}


def _partial(device, numel: int, dtype, rank: int, seed: int, offset: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randn(numel + offset, generator=gen).to(dtype).to(device)[offset:]


def _close(out: torch.Tensor, ref: torch.Tensor, dtype) -> tuple[bool, float]:
    rtol, atol = TOLERANCES[dtype]
    diff = (out.double() - ref.double()).abs()
    ok = bool(torch.isfinite(out).all()) and bool((diff <= atol + rtol * ref.double().abs()).all())
    return ok, float(diff.max()) if diff.numel() else 0.0


def _compare(group, device, numel: int, dtype, offset: int = 0) -> dict:
    import torch.distributed as dist

    x = _partial(device, numel, dtype, group.rank, numel, offset)
    custom = group.custom is not None and group.custom.fits(x)
    ref = x.clone()
    dist.all_reduce(ref, group=group.compute)
    out = group.all_reduce_(x)
    ok, err = _close(out, ref, dtype)
    return {"what": "eager", "numel": numel, "dtype": str(dtype), "offset": offset, "custom": custom,
            "ok": ok and out.data_ptr() == x.data_ptr(), "max_abs_err": err}


def _compare_in_graph(group, device, numel: int) -> dict:
    """Capture group.all_reduce_ on a static tensor, then replay it on fresh data three times."""
    import torch.distributed as dist

    static = _partial(device, numel, torch.bfloat16, group.rank, 1)
    group.all_reduce_(static.clone())  # eager first, like DecodeGraphs.capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        group.all_reduce_(static)
    oks, errs = [], []
    for trial in range(3):
        fresh = _partial(device, numel, torch.bfloat16, group.rank, 100 + trial)
        ref = fresh.clone()
        dist.all_reduce(ref, group=group.compute)
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        ok, err = _close(static, ref, torch.bfloat16)
        oks.append(ok)
        errs.append(err)
    return {"what": "cuda_graph", "numel": numel, "dtype": "torch.bfloat16",
            "custom": group.custom is not None and group.custom.fits(static), "ok": all(oks), "max_abs_err": max(errs)}


def _compare_gather(group, device, n: int, shard: int) -> dict:
    """gather_vocab (by sum where the symmetric path takes it) against the NCCL all_gather path."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    local = _partial(device, n * shard, dtype, group.rank, 7 + shard).view(n, shard)
    vocab = group.world_size * shard - 3
    got = group.gather_vocab(local, vocab)
    custom, group.custom = group.custom, None
    try:
        ref = group.gather_vocab(local, vocab)
    finally:
        group.custom = custom
    return {"what": "gather_vocab", "n": n, "shard": shard, "custom": custom is not None,
            "ok": tuple(got.shape) == (n, vocab) and bool(torch.equal(got, ref)), "max_abs_err": None}


def _compare_norm(group, device, rows: int, hidden: int, graph: bool) -> dict:
    """group.fused_all_reduce_rms_norm against the reference on every rank's partials (all-gathered), eagerly or
    captured once and replayed on fresh data five times (each replay a new slot); every rank must get the same
    bits. Past NORM_MAX_ROWS it must decline (None)."""
    import torch.distributed as dist

    from backend.kernels.all_reduce_norm import all_reduce_rms_norm_ref

    def inputs(seed: int) -> tuple:
        x = _partial(device, rows * hidden, torch.bfloat16, group.rank, seed).view(rows, hidden)
        residual = _partial(device, rows * hidden, torch.bfloat16, 0, seed + 1).view(rows, hidden)
        return x, residual

    weight = _partial(device, hidden, torch.bfloat16, 0, 3).abs() + 0.5
    static_x, static_res = inputs(10)
    got = group.fused_all_reduce_rms_norm(static_x, static_res, weight, 1e-5)
    result = {"what": "norm_graph" if graph else "norm", "rows": rows, "hidden": hidden, "custom": got is not None}
    if got is None:
        return dict(result, ok=rows > car.NORM_MAX_ROWS, max_abs_err=None)
    trials = [(static_x, static_res, got)]
    if graph:
        torch.cuda.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            out = group.fused_all_reduce_rms_norm(static_x, static_res, weight, 1e-5)
        trials = []
        for trial in range(5):
            x, residual = inputs(20 + trial)
            static_x.copy_(x)
            static_res.copy_(residual)
            cuda_graph.replay()
            trials.append((x, residual, tuple(t.clone() for t in out)))
    oks, errs = [], []
    for x, residual, (normed, summed) in trials:
        everyone = torch.empty((group.world_size, rows, hidden), dtype=x.dtype, device=device)
        dist.all_gather_into_tensor(everyone, x.contiguous(), group=group.compute)
        want_normed, want_summed = all_reduce_rms_norm_ref(list(everyone), residual, weight, 1e-5)
        normed_everywhere = torch.empty_like(everyone)
        dist.all_gather_into_tensor(normed_everywhere, normed, group=group.compute)
        err = float((normed.float() - want_normed.float()).abs().max())
        oks.append(torch.equal(summed, want_summed) and err <= 2e-2 * float(want_normed.float().abs().max())
                   and all(torch.equal(n, normed) for n in normed_everywhere))
        errs.append(err)
    return dict(result, ok=all(oks), max_abs_err=max(errs))


def rank_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    for name in ("--rank", "--world", "--port"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nccl-only", action="store_true", help="custom_all_reduce off")
    args = parser.parse_args(argv)
    import torch.distributed as dist
    from backend.engine.parallel.group import join_group
    from backend.engine.parallel.worker import watch_parent

    watch_parent(os.getppid())  # a launcher killed on timeout takes its ranks with it (no GPU left spinning)
    device = torch.device("cuda", args.rank) if args.device == "cuda" else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", args.port, args.world, is_master=False)
    group = join_group(args.rank, args.world, device, 120.0, store, custom_all_reduce_enabled=not args.nccl_only)
    result = rank_check(group, device)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    group.destroy()
    return 0 if result["ok"] else 1


def _failures(results: list[dict]) -> list:
    return [r.get("error") or [c for c in r.get("checks", []) if not c["ok"]] for r in results
            if r.get("error") or not r.get("ok")]


def test_two_cpu_ranks_fall_back_to_dist_all_reduce():
    results = launch_ranks(2, ["--device", "cpu"])
    assert not _failures(results), _failures(results)
    assert [r["path"] for r in results] == ["dist.all_reduce"] * 2
    assert results[0]["note"] == "not on CUDA"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")
@pytest.mark.parametrize("world", [2])
def test_symmetric_memory_all_reduce_matches_nccl(world, monkeypatch):
    monkeypatch.delenv("TRITIUM_AR_NORM", raising=False)  # the fused all-reduce + RMSNorm is on by default
    results = launch_ranks(world, ["--device", "cuda"])
    if os.environ.get("TRITIUM_AR_TEST_JSON"):  # perf/gpu_tp_allreduce.sh keeps every check's numbers
        with open(os.environ["TRITIUM_AR_TEST_JSON"], "w") as f:
            json.dump(results, f, indent=1)
    assert not _failures(results), _failures(results)
    assert [r["path"] for r in results] == ["symm_mem"] * world, [r.get("note") for r in results]
    took = {(c["what"], c.get("numel"), c.get("dtype")) for c in results[0]["checks"] if c["custom"]}
    assert ("eager", 4096, "torch.bfloat16") in took and ("cuda_graph", 4096, "torch.bfloat16") in took
    assert ("eager", 1_000_000, "torch.float32") in took  # two-shot
    fused = {(c["what"], c["rows"]) for c in results[0]["checks"] if c["what"].startswith("norm") and c["custom"]}
    assert fused == {("norm", 1), ("norm", 5), ("norm", car.NORM_MAX_ROWS), ("norm_graph", 1), ("norm_graph", 3)}


if __name__ == "__main__":
    sys.exit(rank_main())
