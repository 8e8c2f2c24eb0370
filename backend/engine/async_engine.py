"""A thread-safe wrapper: a server feeds requests from its threads while one background thread steps.

Each request gets a RequestStream, a queue of RequestOutputs that ends with a finished one. Engine calls are
serialized by one lock, so add/abort happen between steps. The lock is handed over fairly: a plain Lock let
the step thread take it back at once, and under load add_request/abort/stats waited 1-3 s (several steps),
which showed up as time to first token; now the step thread yields while callers are waiting.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import traceback

from .config import EngineConfig
from .engine import LLMEngine
from .errors import EngineError
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05
CALLER_YIELD_S = 0.0002


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished output."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._queue: queue.Queue[RequestOutput] = queue.Queue()
        self.finished = False
        self.on_put = None  # optional callable, run after each put (on the engine's thread: keep it cheap)

    def put(self, output: RequestOutput) -> None:
        self._queue.put(output)
        on_put = self.on_put
        if on_put is not None:
            on_put()

    def get(self, timeout: float | None = None) -> RequestOutput:
        """Blocks until the next output; raises queue.Empty after `timeout` seconds."""
        output = self._queue.get(timeout=timeout)
        self.finished = output.finished
        return output

    def __iter__(self):
        while not self.finished:
            yield self.get()


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config)
        self._lock = threading.Lock()
        self._waiting_callers = 0  # callers blocked on _lock; the step thread lets them in first
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tritium-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        return self.engine.eos_token_ids

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Validation errors (InvalidParameterError, EngineOverloadedError) are raised here, synchronously."""
        if self._stopping:
            raise EngineError("the engine is shutting down")
        stream = RequestStream(request_id)
        with self._caller():
            self.engine.add_request(request_id, prompt_token_ids, params)
            self._streams[request_id] = stream
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Frees the request's KV blocks now; its stream receives a final 'abort' output."""
        with self._caller():
            output = self.engine.abort_request(request_id)
            if output is not None:
                self._deliver([output])

    def stats(self) -> dict:
        with self._caller():
            return self.engine.stats()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Aborts what is still running and stops the step thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            for request_id in list(self._streams):
                output = self.engine.abort_request(request_id)
                if output is not None:
                    self._deliver([output])
            self.engine.shutdown()  # stops tensor-parallel workers: none may outlive the instance

    @contextlib.contextmanager
    def _caller(self):
        """The engine lock for a thread other than the step thread, which waits for it to get in."""
        with self._count_lock:
            self._waiting_callers += 1
        try:
            self._lock.acquire()
        finally:
            with self._count_lock:
                self._waiting_callers -= 1
        try:
            yield
        finally:
            self._lock.release()

    def _let_callers_in(self) -> None:
        while self._waiting_callers and not self._stopping:
            time.sleep(CALLER_YIELD_S)

    def _loop(self) -> None:
        while not self._stopping:
            self._let_callers_in()
            if not self._step_once():
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()

    def _step_once(self) -> bool:
        """One engine step; False when there was nothing to do."""
        with self._lock:
            if not self.engine.has_unfinished():
                return False
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a fault fails the affected requests, never the server silently
                log.error("engine step failed: %s", traceback.format_exc())
                outputs = self.engine.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            self._deliver(outputs)
        return True

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream.put(output)
