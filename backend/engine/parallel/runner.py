"""Rank 0 of a tensor-parallel engine: the ModelRunner the engine talks to, driving K-1 worker processes.

DriverRunner is a ModelRunner over its own weight shard that, before each forward, broadcasts the step's
host inputs to the workers (channel.py), so all ranks run the same forward in lockstep; it alone samples.
It never waits on the GPU without watching the workers (a collective with a dead peer would wait forever),
and after any failure every later step fails at once: the ranks are no longer in lockstep.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from backend.engine.config import EngineConfig
from backend.engine.errors import EngineError
from backend.engine.model_config import ModelConfig
from backend.engine.model_runner import ModelRunner, resolve_device
from backend.engine.outputs import SampledTokens, SchedulerOutput

from .channel import send_step, send_stop
from .group import host_store, join_group, store_timeout_s
from .sharding import check_divisible
from .worker import READY_KEY
from .workers import WorkerDiedError, WorkerPool

log = logging.getLogger(__name__)

POLL_S = 20e-6  # between event queries while waiting for a step: ~ the cost of one query
HEALTH_CHECK_S = 0.05  # how often that wait also checks the workers
DEATH_GRACE_S = 2.0  # after a collective fails: time for the dead worker's exit to be seen
DESTROY_WAIT_S = 10.0


def make_runner(config: EngineConfig, checkpoint_dir: Path) -> ModelRunner:
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, checkpoint_dir)
    return DriverRunner(config, checkpoint_dir)


class DriverRunner(ModelRunner):
    def __init__(self, config: EngineConfig, checkpoint_dir: Path):
        world = config.tensor_parallel_size
        check_divisible(ModelConfig.from_dir(checkpoint_dir), world)  # before starting any process
        if dist.is_initialized():
            raise EngineError("tensor_parallel_size > 1: this process already runs a torch.distributed group "
                              "(one tensor-parallel engine per process)")
        device = resolve_device(config.device, config.device_ids, 0)
        timeout = store_timeout_s()
        store = host_store(world, timeout)
        self._failure: str | None = None
        self._stopped = False
        self.pool = WorkerPool(world, store.port, config.to_dict(), str(checkpoint_dir))
        try:
            self._wait_for_workers(store, world, timeout)
            group = join_group(0, world, device, timeout, store, config.custom_all_reduce)
            super().__init__(config, checkpoint_dir, device=device, parallel=group)
            self.pool.on_death(self._on_worker_death)  # from here on NCCL collectives run (warm-up, steps)
        except BaseException:
            self.pool.stop(graceful=False)
            _destroy_in_background()
            raise

    def _wait_for_workers(self, store, world: int, timeout: float) -> None:
        """Until every worker has started (imported torch, reached the store); a worker that dies on the way
        fails the load now rather than after the rendezvous timeout."""
        keys = [READY_KEY.format(rank=rank) for rank in range(1, world)]
        deadline = time.monotonic() + timeout
        while not store.check(keys):
            self.pool.check_alive()
            if time.monotonic() > deadline:
                raise EngineError(f"tensor-parallel workers did not start within {timeout:.0f} s")
            time.sleep(0.05)

    # ---- steps ------------------------------------------------------------------------------------------

    def _forward(self, scheduled: SchedulerOutput):
        self._check_healthy()
        try:
            step = self.host_inputs(scheduled)
            send_step(self.parallel, step)
            logits = self.forward_step(step)
        except Exception as exc:
            self._fail(exc)
        return logits, [chunk for chunk in scheduled.chunks if chunk.samples]

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> SampledTokens:
        logits, sampling = self._forward(scheduled)
        self._wait_for_device()
        self._last_sampled, self._last_sample_index = None, {}
        return self.sampler(logits, [chunk.request for chunk in sampling], [chunk.output_index for chunk in sampling])

    @torch.inference_mode()
    def launch(self, scheduled: SchedulerOutput):
        return WatchedTokens(super().launch(scheduled), self)

    def _wait_for_device(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self.wait_for_event(event)

    def wait_for_event(self, event) -> None:
        """event.synchronize(), but checking the workers meanwhile: with NCCL a dead peer never lets it end."""
        next_check = time.monotonic() + HEALTH_CHECK_S
        while not event.query():
            time.sleep(POLL_S)
            if time.monotonic() > next_check:
                self._check_healthy()
                next_check = time.monotonic() + HEALTH_CHECK_S

    # ---- failures and shutdown ---------------------------------------------------------------------------

    def _check_healthy(self) -> None:
        if self._failure is not None:
            raise WorkerDiedError(self._failure)
        self.pool.check_alive()

    def _on_worker_death(self, message: str) -> None:
        """Monitor thread: record it, and unblock a collective that waits for the dead worker."""
        self._failure = message
        self.parallel.abort()

    def _fail(self, exc: Exception):
        """A step failed part-way: the ranks are out of lockstep for good. Say why, naming a dead worker."""
        deadline = time.monotonic() + DEATH_GRACE_S
        while time.monotonic() < deadline:
            try:
                self.pool.check_alive()
            except WorkerDiedError as died:
                self._failure = str(died)
                raise died from exc
            time.sleep(0.05)
        self._failure = f"tensor-parallel step failed: {type(exc).__name__}: {exc}"
        raise exc

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them (then SIGTERM/SIGKILL), and leave the process group."""
        if self._stopped:
            return
        self._stopped = True
        healthy = self._failure is None and self.pool.failure is None
        if healthy:
            try:
                send_stop(self.parallel)
            except Exception as exc:
                log.warning("could not tell the workers to stop: %s", exc)
                healthy = False
        if healthy:
            # Leave the group while the workers leave it, graphs first (release_graphs says why): on 2x H200
            # with the graphs alive, every rank's ProcessGroupNCCL.shutdown waited until it was killed, and
            # rank 0 then aborted at interpreter exit (perf/RESULTS.md, issue 6, session 8).
            self.release_graphs()
            _destroy_in_background()
            self.pool.stop(graceful=True)
            return
        self.pool.stop(graceful=False)
        self.parallel.abort()
        _destroy_in_background()


class WatchedTokens:
    """PendingTokens whose wait checks the workers (async scheduling's result() of a launched step)."""

    def __init__(self, pending, runner: DriverRunner):
        self._pending, self._runner = pending, runner

    def result(self) -> SampledTokens:
        event = getattr(self._pending, "_event", None)
        if event is not None:
            self._runner.wait_for_event(event)
        return self._pending.result()


def _destroy_in_background() -> None:
    """destroy_process_group can block on a communicator whose peer died; never let it hang a shutdown."""
    if not dist.is_initialized():
        return
    thread = threading.Thread(target=_destroy_quietly, name="tritium-tp-destroy", daemon=True)
    thread.start()
    thread.join(DESTROY_WAIT_S)
    if thread.is_alive():
        frame = sys._current_frames().get(thread.ident)
        where = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
        log.warning("torch.distributed did not shut down within %.0f s; continuing. It waits in:\n%s",
                    DESTROY_WAIT_S, where)


def _destroy_quietly() -> None:
    try:
        dist.destroy_process_group()
    except Exception as exc:
        log.warning("destroy_process_group: %s", exc)
