"""One request's life after `execute`: engine outputs in, responses out. Triton-free (tested with fakes).

The sink is whatever can send a response: `send(outputs: dict, final: bool)`, `send_error(message, code_name)`
(always final; code_name as in engine/errors.error_code_name) and `is_cancelled()`. The final flag rides on the
last data response, so a non-streamed request gets exactly one response, which the HTTP generate endpoint and
Triton's OpenAI frontend need.
An optional observer hears of token arrivals and of the request's end (latency metrics); it runs on the
thread that streams the responses (one of the server's responder threads), so it must be cheap.
"""
from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from backend.engine.outputs import RequestOutput

from .detokenizer import IncrementalDetokenizer
from .request_parser import GenerationRequest

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05  # how often a request waiting on the engine checks for client cancellation


class Sink(Protocol):
    def send(self, outputs: dict[str, np.ndarray], final: bool) -> None: ...
    def send_error(self, message: str, code_name: str = "INTERNAL") -> None: ...
    def is_cancelled(self) -> bool: ...


class SessionObserver(Protocol):
    def on_tokens(self, state: "SessionState", num_new: int, previous_token_ns: int) -> None:
        """`num_new` tokens arrived at state.last_token_ns; the one before them at previous_token_ns (0: none)."""

    def on_finish(self, state: "SessionState", outcome: str) -> None:
        """Once per request: outcome is "success", "error", "cancelled" (by the client) or "aborted" (engine)."""


class NoObserver:
    def on_tokens(self, state, num_new: int, previous_token_ns: int) -> None:
        pass

    def on_finish(self, state, outcome: str) -> None:
        pass


@dataclass
class SessionState:
    """What accumulates over a request: counts, log probs and timestamps for the response fields."""

    arrival_ns: int = field(default_factory=time.time_ns)
    first_token_ns: int = 0
    last_token_ns: int = 0
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_new_blocks: int = 0
    num_cached_tokens: int = 0
    cum_logprob: float = 0.0
    finish_reason: str | None = None


class Session:
    def __init__(self, engine, request_id: str, request: GenerationRequest, stream, sink: Sink, block_size: int,
                 observer: SessionObserver | None = None):
        self.engine = engine
        self.request_id = request_id
        self.request = request
        self.stream = stream
        self.sink = sink
        self.block_size = block_size
        self.detok = IncrementalDetokenizer(engine.tokenizer, request.prompt_ids, request.stop_strings)
        self.state = SessionState(num_input_tokens=len(request.prompt_ids))
        self._text: list[str] = [request.echo_text] if request.echo_text else []
        self._logprobs: list[float] = []
        self._token_ids: list[int] = []  # since the last response, when the client asked for output_ids
        self.observer = observer or NoObserver()
        self._outcome: str | None = None

    def run(self) -> None:
        """Streams until the request finishes, stops on a stop string, fails, or is cancelled (blocking: for a
        caller that gives each request its own thread; the server's Responder uses poll instead)."""
        self._guarded(self._run)

    @property
    def done(self) -> bool:
        """The final response is sent (what the stream still holds, e.g. the abort after a stop string, is not
        for the client)."""
        return self._outcome is not None

    def poll(self) -> bool:
        """Consumes whatever outputs are ready without waiting; True once the request's final response is sent."""
        return self.done or self._guarded(lambda: self._consume_ready(self._take_ready([])))

    def cancel_if_requested(self) -> bool:
        """Aborts the engine request if the client has gone; True if it did (the final response is sent)."""
        return self.done or self._guarded(lambda: self.sink.is_cancelled() and self._cancel())

    def _guarded(self, step) -> bool:
        try:
            return bool(step())
        except Exception as exc:  # never let one request's fault kill the response thread silently
            log.exception("request %s failed", self.request_id)
            self.engine.abort(self.request_id)
            self.sink.send_error(f"internal error: {type(exc).__name__}: {exc}")
            self._finish("error")
            return True

    def _run(self) -> None:
        last_cancel_check = time.monotonic()
        while True:
            outputs = self._next_outputs()
            if time.monotonic() - last_cancel_check >= CANCEL_POLL_S or not outputs:
                last_cancel_check = time.monotonic()
                if self.sink.is_cancelled():
                    self._cancel()
                    return
            if self._consume_ready(outputs):
                return

    def _next_outputs(self) -> list[RequestOutput]:
        """Waits briefly for one output, then takes whatever else is ready, so a slow client gets fewer,
        larger responses instead of falling behind."""
        try:
            return self._take_ready([self.stream.get(timeout=CANCEL_POLL_S)])
        except queue.Empty:
            return []

    def _take_ready(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        while not (outputs and outputs[-1].finished):
            try:
                outputs.append(self.stream.get(timeout=0))
            except queue.Empty:
                break
        return outputs

    def _consume_ready(self, outputs: list[RequestOutput]) -> bool:
        return bool(outputs) and self._consume(outputs)

    def _consume(self, outputs: list[RequestOutput]) -> bool:
        """Folds engine outputs into the response; True once the final response is sent."""
        last = outputs[-1]
        if last.error_code:  # the engine refused the request (engine process): its message and code as they are
            self.sink.send_error(last.error, last.error_code)
            self._finish("rejected")
            return True
        if last.error:
            self.sink.send_error(f"generation failed: {last.error}")
            self._finish("error")
            return True
        token_ids = [t for out in outputs for t in out.new_token_ids]
        self._update_state(outputs, token_ids)
        if self.request.return_output_ids:
            self._token_ids += token_ids
        delta = self.detok.add(token_ids)
        if self.detok.stopped:
            self.engine.abort(self.request_id)  # frees the KV blocks now; the stream's abort output is dropped
            self.state.finish_reason = "stop"
            return self._respond_final(delta + self.detok.finish())
        if last.finished:
            self.state.finish_reason = last.finish_reason
            return self._respond_final(delta + self.detok.finish())
        return self._respond(delta, final=False)

    def _respond_final(self, text: str) -> bool:
        self._respond(text, final=True)
        self._finish("aborted" if self.state.finish_reason == "abort" else "success")
        return True

    def _finish(self, outcome: str) -> None:
        """Tells the observer once: an exception raised after an outcome was recorded does not count again."""
        if self._outcome is None:
            self._outcome = outcome
            self.observer.on_finish(self.state, outcome)

    def _update_state(self, outputs: list[RequestOutput], token_ids: list[int]) -> None:
        s, last = self.state, outputs[-1]
        previous_token_ns = s.last_token_ns
        if token_ids:
            s.last_token_ns = time.time_ns()
            s.first_token_ns = s.first_token_ns or s.last_token_ns
        s.num_input_tokens = last.num_prompt_tokens or s.num_input_tokens
        s.num_output_tokens = last.num_output_tokens
        s.num_new_blocks, s.num_cached_tokens = last.num_new_blocks, last.num_cached_tokens
        for out in outputs:
            self._logprobs += out.new_logprobs or []
            s.cum_logprob += float(sum(out.new_logprobs or []))
        if token_ids:
            self.observer.on_tokens(s, len(token_ids), previous_token_ns)

    def _respond(self, delta: str, final: bool) -> bool:
        if not self.request.stream:
            self._text.append(delta)
            if final:
                self.sink.send(self._outputs("".join(self._text), self._logprobs), final=True)
            return final
        if delta or final:
            self.sink.send(self._outputs(delta, self._logprobs), final=final)
            self._logprobs, self._token_ids = [], []
        return final

    def _cancel(self) -> bool:
        self.engine.abort(self.request_id)
        self.state.finish_reason = "abort"
        self.sink.send_error("request cancelled by the client")
        self._finish("cancelled")
        return True

    def _outputs(self, text: str, logprobs: list[float]) -> dict[str, np.ndarray]:
        outputs = build_outputs(text, logprobs, self.state, self.request, self.block_size)
        if self.request.return_output_ids:
            outputs["output_ids"] = np.array([self._token_ids], dtype=np.int32).reshape(1, len(self._token_ids))
        return outputs


def build_outputs(text: str, logprobs: list[float], state: SessionState, request: GenerationRequest,
                  block_size: int) -> dict[str, np.ndarray]:
    """The response tensors (batch dimension 1). Optional fields only when asked for."""
    out = {
        "text_output": np.array([[text.encode("utf-8")]], dtype=np.object_),
        "finish_reason": np.array([[(state.finish_reason or "").encode()]], dtype=np.object_),
    }
    if request.return_log_probs:
        out["cum_log_probs"] = np.array([[state.cum_logprob]], dtype=np.float32)
        out["output_log_probs"] = np.array([[logprobs]], dtype=np.float32).reshape(1, 1, len(logprobs))
    if request.return_num_input_tokens:
        out["num_input_tokens"] = np.array([[state.num_input_tokens]], dtype=np.int32)
    if request.return_num_output_tokens:
        out["num_output_tokens"] = np.array([[state.num_output_tokens]], dtype=np.int32)
    if request.return_perf_metrics:
        out.update(_perf_outputs(state, block_size))
    return out


def _perf_outputs(state: SessionState, block_size: int) -> dict[str, np.ndarray]:
    return {
        "arrival_time_ns": np.array([[state.arrival_ns]], dtype=np.int64),
        "first_token_time_ns": np.array([[state.first_token_ns]], dtype=np.int64),
        "last_token_time_ns": np.array([[state.last_token_ns]], dtype=np.int64),
        "kv_cache_alloc_new_blocks": np.array([[state.num_new_blocks]], dtype=np.int32),
        "kv_cache_reused_blocks": np.array([[state.num_cached_tokens // max(block_size, 1)]], dtype=np.int32),
    }
