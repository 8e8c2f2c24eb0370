"""Prometheus metrics of the tritium backend, served by Triton's metrics endpoint (:8002/metrics).

Two sources feed them:
- `RequestRecorder`, a Session observer (Triton-free): time to first token, inter-token latency and request
  latency histograms, prompt/generated token counters, request outcomes.
- `engine.stats()`: running/waiting requests and KV blocks as gauges, preemptions and prefix-cache hits as
  counters.

Every metric call from the Python backend stub is a synchronous message to the tritonserver process
(measured here: 12-23 us per observe()/increment(), the GIL released meanwhile). So request threads only
append to in-process buffers, and one thread pushes them to Triton every REFRESH_S: counters as one
increment per flush, histogram observations one call each (~50,000 a second fit in that thread).
tritonserver 2.51's Python backend has native HISTOGRAM metric families (verified against the real server:
`_bucket{le=...}`, `_sum` and `_count` series), so histograms are real Prometheus histograms.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter

log = logging.getLogger(__name__)

REFRESH_S = 0.2

TTFT = "tritium_time_to_first_token_seconds"
ITL = "tritium_inter_token_latency_seconds"
REQUEST_LATENCY = "tritium_request_latency_seconds"
PROMPT_TOKENS = "tritium_prompt_tokens_total"
GENERATION_TOKENS = "tritium_generation_tokens_total"
REQUEST_SUCCESS = "tritium_request_success_total"
REQUEST_FAILURE = "tritium_request_failure_total"
FAILURE_REASONS = ("rejected", "error", "cancelled", "aborted")

# Bucket bounds in seconds: TTFT spans a fast GPU prefill (ms) to a long queue on CPU (minutes); ITL spans a
# batch-1 GPU decode step (~6 ms on the Llama-3-8B shape) to a slow CPU step.
HISTOGRAMS = {
    TTFT: ("time from the request reaching the engine model to its first generated token",
           (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)),
    ITL: ("time between consecutive generated tokens of a request",
          (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)),
    REQUEST_LATENCY: ("time from the request reaching the engine model to its final response (successful requests)",
                      (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)),
}
COUNTERS = {
    PROMPT_TOKENS: "prompt tokens of requests that ended (any outcome)",
    GENERATION_TOKENS: "generated tokens of requests that ended (any outcome)",
    REQUEST_SUCCESS: "requests that ended with their final response",
    REQUEST_FAILURE: "requests that failed, by reason: rejected (invalid), error, cancelled (client), aborted (engine)",
}
# engine.stats() keys that only grow: exported as counters; every other numeric key is a gauge tritium_<key>.
ENGINE_COUNTERS = {
    "num_preemptions": ("tritium_preemptions_total", "requests preempted (KV blocks freed, recomputed later)"),
    "prefix_cache_hit_tokens": ("tritium_prefix_cache_hit_tokens_total", "prompt tokens served from the prefix cache"),
    "prefix_cache_hit_blocks": ("tritium_prefix_cache_hit_blocks_total", "KV blocks reused from the prefix cache"),
    "prefix_cache_query_tokens": ("tritium_prefix_cache_query_tokens_total",
                                  "prompt tokens looked up in the prefix cache"),
}  # "steps" stays the gauge tritium_steps: tests and dashboards read it under that name


class RequestRecorder:
    """Buffers per-request observations until the exporter takes them. A Session observer; Triton-free."""

    def __init__(self):
        self._lock = threading.Lock()
        self._observations: list[tuple[str, float]] = []
        self._counts: Counter[tuple[str, str]] = Counter()  # (metric, failure reason or "") -> amount

    def on_tokens(self, state, num_new: int, previous_token_ns: int) -> None:
        if previous_token_ns == 0:  # the first tokens: tokens that came with the first one add zero gaps
            observations = [(TTFT, (state.first_token_ns - state.arrival_ns) / 1e9)] + [(ITL, 0.0)] * (num_new - 1)
        else:  # several tokens in one batch (a slow reader): each gets the mean gap, so counts stay per token
            observations = [(ITL, (state.last_token_ns - previous_token_ns) / 1e9 / num_new)] * num_new
        with self._lock:
            self._observations += observations

    def on_finish(self, state, outcome: str) -> None:
        if outcome == "rejected":  # refused by the engine process: counted like a request refused at start
            self.on_rejected()
            return
        with self._lock:
            self._counts[(PROMPT_TOKENS, "")] += state.num_input_tokens
            self._counts[(GENERATION_TOKENS, "")] += state.num_output_tokens
            if outcome == "success":
                self._counts[(REQUEST_SUCCESS, "")] += 1
                # called right after the final response went out: now is when the client got its answer
                self._observations.append((REQUEST_LATENCY, (time.time_ns() - state.arrival_ns) / 1e9))
            else:
                self._counts[(REQUEST_FAILURE, outcome)] += 1

    def on_rejected(self) -> None:
        with self._lock:
            self._counts[(REQUEST_FAILURE, "rejected")] += 1

    def take(self) -> tuple[list[tuple[str, float]], Counter]:
        """What was recorded since the last call."""
        with self._lock:
            taken = self._observations, self._counts
            self._observations, self._counts = [], Counter()
        return taken


class ServingMetrics:
    """Creates the Triton metric families and pushes recorded requests and engine statistics to them."""

    def __init__(self, pb_utils, engine, labels: dict[str, str], refresh_s: float = REFRESH_S):
        self.recorder = RequestRecorder()
        # Read the offline engine's counters directly: they are plain len()s and ints, and AsyncEngine.stats()
        # waits on the step lock, which the step thread re-takes at once (measured: 1-2 s stale under load).
        inner = getattr(engine, "engine", None)
        self._stats = getattr(inner, "stats", None) or engine.stats
        self._families = _Families(pb_utils, labels)
        for name, description in ENGINE_COUNTERS.values():  # shown at 0 from the start, like the others
            self._families.counter(name, "", description)
        self._engine_totals: dict[str, float] = {}
        self._sessions_started = 0
        self.refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tritium-metrics", daemon=True)

    def start(self) -> "ServingMetrics":
        self.update()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.update()  # what the last requests recorded

    def observer(self) -> RequestRecorder:
        """The observer for a new Session (called once per session started: admission counting relies on it)."""
        self._sessions_started += 1
        return self.recorder

    def admit(self, start, request) -> None:
        """Runs the adapter's start for one request: one that started no session was rejected (bad input,
        engine full or stopping). execute() runs one call at a time per instance, so the count is exact."""
        before = self._sessions_started
        start(request)
        if self._sessions_started == before:
            self.recorder.on_rejected()

    def update(self) -> None:
        self._push_requests()
        self._push_engine_stats()

    def _push_requests(self) -> None:
        observations, counts = self.recorder.take()
        for (name, reason), amount in counts.items():
            if amount:
                self._families.counter(name, reason).increment(float(amount))
        for name, value in observations:
            self._families.histogram(name).observe(value)

    def _push_engine_stats(self) -> None:
        for key, value in self._stats().items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key in ENGINE_COUNTERS:
                self._push_engine_counter(key, float(value))
            else:
                self._families.gauge(f"tritium_{key}", f"engine statistic {key}").set(float(value))

    def _push_engine_counter(self, key: str, total: float) -> None:
        delta = total - self._engine_totals.get(key, 0.0)
        if delta > 0:  # a counter only grows; the engine's totals never shrink within a process
            name, description = ENGINE_COUNTERS[key]
            self._families.counter(name, "", description).increment(delta)
            self._engine_totals[key] = total

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.update()
            except Exception:  # metrics must never take the model down
                log.exception("updating metrics failed")


class _Families:
    """Triton metric families and their one labelled metric each (failure reasons: one metric per reason)."""

    def __init__(self, pb_utils, labels: dict[str, str]):
        self.pb_utils = pb_utils
        self.labels = labels
        self._families: dict[str, object] = {}  # kept alive: a family's metrics vanish with it
        self._metrics: dict[tuple[str, str], object] = {}
        for name, (description, buckets) in HISTOGRAMS.items():
            self._metrics[(name, "")] = self._family(name, description, "HISTOGRAM").Metric(
                labels=labels, buckets=list(buckets))
        for name in COUNTERS:  # created up front so they read 0 before the first request (rate() needs that)
            for reason in (FAILURE_REASONS if name == REQUEST_FAILURE else ("",)):
                self.counter(name, reason)

    def histogram(self, name: str):
        return self._metrics[(name, "")]

    def counter(self, name: str, reason: str, description: str | None = None):
        return self._metric(name, reason, description or COUNTERS[name], "COUNTER")

    def gauge(self, name: str, description: str):
        return self._metric(name, "", description, "GAUGE")

    def _metric(self, name: str, reason: str, description: str, kind: str):
        metric = self._metrics.get((name, reason))
        if metric is None:
            labels = {**self.labels, "reason": reason} if reason else self.labels
            metric = self._metrics[(name, reason)] = self._family(name, description, kind).Metric(labels=labels)
        return metric

    def _family(self, name: str, description: str, kind: str):
        family = self._families.get(name)
        if family is None:
            kinds = self.pb_utils.MetricFamily
            family = self._families[name] = kinds(name=name, description=description, kind=getattr(kinds, kind))
        return family
