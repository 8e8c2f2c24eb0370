"""Engine statistics as Triton custom metrics (Prometheus text on the metrics port, :8002/metrics).

Every numeric value of `engine.stats()` becomes a gauge `tritium_<key>` labelled with the model, refreshed
by a small thread, so batching (max_batch_size_seen), KV use and preemptions are visible to operators and
tests without a special request.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

REFRESH_S = 0.2


class EngineMetrics:
    def __init__(self, pb_utils, engine, labels: dict[str, str], refresh_s: float = REFRESH_S):
        self.pb_utils = pb_utils
        # Read the offline engine's counters directly: they are plain len()s and ints, and AsyncEngine.stats()
        # waits on the step lock, which the step thread re-takes at once (measured: 1-2 s stale under load).
        inner = getattr(engine, "engine", None)
        self._stats = getattr(inner, "stats", None) or engine.stats
        self.labels = labels
        self.refresh_s = refresh_s
        self._families: dict[str, object] = {}
        self._gauges: dict[str, object] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tritium-metrics", daemon=True)

    def start(self) -> "EngineMetrics":
        self.update()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def update(self) -> None:
        for key, value in self._stats().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._gauge(key).set(float(value))

    def _gauge(self, key: str):
        gauge = self._gauges.get(key)
        if gauge is None:
            family = self.pb_utils.MetricFamily(
                name=f"tritium_{key}", description=f"engine statistic {key}", kind=self.pb_utils.MetricFamily.GAUGE)
            self._families[key] = family
            gauge = self._gauges[key] = family.Metric(labels=self.labels)
        return gauge

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.update()
            except Exception:  # metrics must never take the model down
                log.exception("updating engine metrics failed")
