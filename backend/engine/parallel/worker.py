"""A tensor-parallel worker process (ranks 1..K-1), started by WorkerPool:

    python -m backend.engine.parallel.worker --rank 1 --world-size 2 --store-port P --checkpoint DIR \\
        --parent-pid PID --config '{...EngineConfig...}'

It builds the same ModelRunner as rank 0 (its own weight shard, an equal KV cache, the same warm-up and CUDA
graphs), then runs each step rank 0 broadcasts until told to stop. It never schedules or samples.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback

PARENT_POLL_S = 0.5
READY_KEY = "tritium_worker_ready_{rank}"

log = logging.getLogger("tritium.tp_worker")


def watch_parent(parent_pid: int) -> None:
    """Exit as soon as the engine's process is gone (re-parented), so no worker outlives it."""
    def loop() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def serve(args: argparse.Namespace) -> None:
    import torch

    from backend.engine.config import EngineConfig
    from backend.engine.engine import resolve_max_model_len
    from backend.engine.model_runner import ModelRunner, resolve_device
    from backend.engine.parallel.channel import receive_step
    from backend.engine.parallel.group import join_group, store_timeout_s
    import torch.distributed as dist

    config = EngineConfig.from_dict(json.loads(args.config))
    device = resolve_device(config.device, config.device_ids, args.rank)
    if device.type == "cpu":  # share the cores with rank 0 rather than oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    store = dist.TCPStore("127.0.0.1", args.store_port, args.world_size, is_master=False)
    store.set(READY_KEY.format(rank=args.rank), "1")
    group = join_group(args.rank, args.world_size, device, store_timeout_s(), store=store,
                       custom_all_reduce_enabled=config.custom_all_reduce)
    runner = ModelRunner(config, args.checkpoint, device=device, parallel=group)
    runner.warm_up(resolve_max_model_len(runner.model_config, config))
    with torch.inference_mode():
        while (step := receive_step(group)) is not None:
            runner.forward_step(step)
    runner.release_graphs()  # before leaving the group: NCCL's shutdown waits for graphs with its collectives
    group.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store-port", type=int, required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{args.rank} %(levelname)s %(message)s")
    watch_parent(args.parent_pid)
    try:
        serve(args)
    except Exception:  # rank 0 sees the exit code; the traceback goes to the log (Triton's, in a server)
        log.error("tensor-parallel worker rank %d failed:\n%s", args.rank, traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
