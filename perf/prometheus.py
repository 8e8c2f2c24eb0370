"""Read a Prometheus text endpoint (Triton's :8002/metrics) into numbers (stdlib only)."""
from __future__ import annotations

import re
import urllib.request

_LINE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Series = tuple[str, frozenset]  # (metric name, frozenset of (label, value))


def parse(text: str) -> dict[Series, float]:
    samples = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def scrape(url: str, timeout: float = 5.0) -> dict[Series, float]:
    """url: "host:port" or a full URL; /metrics is added when no path is given."""
    url = url if "://" in url else f"http://{url}"
    url = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode())


def value(samples: dict[Series, float], name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, series_labels), v in samples.items() if n == name and wanted <= series_labels)


def delta(before: dict[Series, float], after: dict[Series, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def histogram_mean(before: dict[Series, float], after: dict[Series, float], name: str, **labels: str) -> float | None:
    """Mean of the observations between two scrapes of a histogram (its _sum and _count series)."""
    count = delta(before, after, f"{name}_count", **labels)
    return delta(before, after, f"{name}_sum", **labels) / count if count else None
