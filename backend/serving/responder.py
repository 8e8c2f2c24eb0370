"""A few threads that stream the responses of every running request.

Why not a thread per request: 256 threads waking to poll and each sending every token as its own response
were part of why the mixed workload on an H200 reached 1,931 output tok/s against 10,250 offline (the larger
part was the engine's step loop sharing the stub's GIL, now in its own process: engine/engine_process.py;
perf/RESULTS.md has the measurements). Here the engine's output reader only marks a session as ready
(a queue put); a lane's thread takes its ready sessions in batches, so when sends fall behind a session sends
one response carrying every token that arrived meanwhile, and one sweep per lane checks its sessions for
client cancellation.

Why several lanes: the stub's `send` releases the GIL and waits for tritonserver to take the response, and
tritonserver takes them on a pool of threads (python_backend's `thread_pool_`, 32 by default), so sends from
different threads overlap (on the H200, 4 lanes and 1 gave the same throughput and 4 the lower TTFT). Each
session belongs to one lane for its whole life, which keeps its responses in order; a new session goes to the
lane with the fewest.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from .engine_settings import DEFAULT_RESPONDER_THREADS
from .session import CANCEL_POLL_S, Session

log = logging.getLogger(__name__)


class Responder:
    def __init__(self, threads: int = DEFAULT_RESPONDER_THREADS, poll_s: float = CANCEL_POLL_S):
        if threads < 1:
            raise ValueError(f"responder threads must be at least 1, got {threads}")
        self._lanes = [_Lane(f"tritium-responder-{i}", poll_s) for i in range(threads)]

    def add(self, session: Session) -> None:
        """Starts streaming `session`; outputs that arrived before this call are picked up at once."""
        min(self._lanes, key=_Lane.active).add(session)

    def active(self) -> int:
        return sum(lane.active() for lane in self._lanes)

    def stop(self, timeout: float) -> None:
        """Waits up to `timeout` for running sessions to send their final responses, then ends the threads."""
        deadline = time.monotonic() + timeout
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.01)
        for lane in self._lanes:
            lane.stop(max(deadline - time.monotonic(), 1.0))


class _Lane:
    """One thread and the sessions it streams."""

    def __init__(self, name: str, poll_s: float):
        self.poll_s = poll_s
        self._ready: queue.SimpleQueue[Session] = queue.SimpleQueue()
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def add(self, session: Session) -> None:
        with self._lock:
            self._sessions.add(session)
        session.stream.on_put = lambda: self._ready.put(session)
        self._ready.put(session)

    def active(self) -> int:
        with self._lock:
            return len(self._sessions)

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        last_sweep = time.monotonic()
        while not self._stopping.is_set():
            try:
                for session in self._take_ready():
                    if session.poll():
                        self._done(session)
                if time.monotonic() - last_sweep >= self.poll_s:
                    last_sweep = time.monotonic()
                    self._sweep_cancelled()
            except Exception:  # Session guards its own faults; this thread must outlive anything else too
                log.exception("responder loop")

    def _take_ready(self) -> set[Session]:
        """Blocks up to poll_s for one ready session, then takes every other one already marked."""
        try:
            ready = {self._ready.get(timeout=self.poll_s)}
        except queue.Empty:
            return set()
        while True:
            try:
                ready.add(self._ready.get_nowait())
            except queue.Empty:
                return ready

    def _sweep_cancelled(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            if session.cancel_if_requested():
                self._done(session)

    def _done(self, session: Session) -> None:
        session.stream.on_put = None
        with self._lock:
            self._sessions.discard(session)
