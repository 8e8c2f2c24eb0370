"""The K-1 worker processes of a tensor-parallel engine: started, watched and stopped with it.

Workers are `python -m backend.engine.parallel.worker` subprocesses (a fresh interpreter: no fork of a
process that holds CUDA or Triton's stub state, and nothing of the parent's __main__ re-imported, unlike
multiprocessing's spawn). Lifetime rules, so that nothing outlives the engine:
  * stop(): STOP on the control group, then wait; SIGTERM, then SIGKILL for a worker that does not exit.
  * the engine's process dies without stop(): each worker watches its parent pid and exits (worker.py);
    weakref.finalize kills them when the pool is collected or the interpreter exits.
  * a worker dies: the monitor thread notices within MONITOR_PERIOD_S, marks the pool failed and calls
    on_death (the driver aborts its NCCL communicator, so a collective waiting for the dead peer returns).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

from backend.engine.errors import EngineError

log = logging.getLogger(__name__)

MONITOR_PERIOD_S = 0.5
STOP_WAIT_S = 10.0
KILL_WAIT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[3]  # the folder holding the `backend` package


class WorkerDiedError(EngineError):
    """A tensor-parallel worker exited: the engine cannot run another step and must be reloaded."""


def child_environment() -> dict[str, str]:
    """os.environ with this repository first on PYTHONPATH: a child started with `python -m backend...` from the
    Triton stub (whose cwd is elsewhere) must import the same code."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def python_executable() -> str:
    """The interpreter for workers. Inside Triton's Python stub sys.executable may be the stub binary; the
    stub finds its packages through the python3 first on PATH (ENVIRONMENT.md), so that is the fallback."""
    if Path(sys.executable).name.startswith("python") and os.access(sys.executable, os.X_OK):
        return sys.executable
    found = shutil.which("python3")
    if found is None:
        raise EngineError("tensor parallelism: no python3 on PATH to start the workers with")
    return found


class WorkerPool:
    def __init__(self, world_size: int, store_port: int, config: dict, checkpoint_dir: str):
        self.failure: str | None = None
        self._on_death: Callable[[str], None] | None = None
        self._stopping = threading.Event()
        self.processes = [self._start(rank, world_size, store_port, config, checkpoint_dir)
                          for rank in range(1, world_size)]
        self._finalizer = weakref.finalize(self, _kill_all, list(self.processes))
        self._monitor = threading.Thread(target=self._watch, name="tritium-tp-monitor", daemon=True)
        self._monitor.start()

    def _start(self, rank: int, world_size: int, port: int, config: dict, checkpoint_dir: str) -> subprocess.Popen:
        env = child_environment()
        argv = [python_executable(), "-m", "backend.engine.parallel.worker", "--rank", str(rank),
                "--world-size", str(world_size), "--store-port", str(port), "--checkpoint", checkpoint_dir,
                "--parent-pid", str(os.getpid()), "--config", json.dumps(config)]
        return subprocess.Popen(argv, env=env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def on_death(self, callback: Callable[[str], None]) -> None:
        self._on_death = callback

    def check_alive(self) -> None:
        """Raises WorkerDiedError naming the dead worker(s) and their exit codes."""
        if self.failure is None:
            dead = [(rank, p.returncode) for rank, p in enumerate(self.processes, start=1) if p.poll() is not None]
            if dead and not self._stopping.is_set():
                self.failure = "tensor-parallel worker(s) died: " + ", ".join(
                    f"rank {rank} (pid {self.processes[rank - 1].pid}, exit code {code})" for rank, code in dead)
        if self.failure is not None:
            raise WorkerDiedError(self.failure + "; the engine must be reloaded")

    def _watch(self) -> None:
        while not self._stopping.wait(MONITOR_PERIOD_S):
            try:
                self.check_alive()
            except WorkerDiedError as exc:
                log.error("%s", exc)
                if self._on_death is not None:
                    self._on_death(str(exc))
                return

    def stop(self, graceful: bool = True) -> None:
        """Waits for workers that were told to stop (graceful), else or then SIGTERM and SIGKILL."""
        self._stopping.set()
        deadline = time.monotonic() + (STOP_WAIT_S if graceful else 0.0)
        for p in self.processes:
            _wait(p, deadline - time.monotonic())
        _kill_all(self.processes)
        self._finalizer.detach()


def _wait(p: subprocess.Popen, timeout: float) -> None:
    try:
        p.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        pass


def _kill_all(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + KILL_WAIT_S
    for p in processes:
        _wait(p, deadline - time.monotonic())
        if p.poll() is None:
            p.kill()
            p.wait()
