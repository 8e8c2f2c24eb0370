"""Helpers for tests that run a real tritonserver: free ports, starting one, and reading the engine's gauges."""
from __future__ import annotations

import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from tools.serve import TritonServer


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def generate_smollm2_repo(repo: Path) -> Path:
    """A repository for the bundled SmolLM2 on CPU (float32) with a 128 MiB KV cache; returns `repo`."""
    from tools.generate_repo import main as generate_repo

    assert generate_repo(["--output-dir", str(repo), "--quiet", "--kv-cache-mb", "128", "--device", "cpu"]) == 0
    return repo


def running_server(repo: Path, log: Path, ready_timeout: float = 240, **options) -> Iterator[TritonServer]:
    """For a fixture: `yield from running_server(...)` starts tritonserver on free ports (`options`: more
    TritonServer arguments), waits until it is ready (printing the end of its log if it never is), and stops
    it afterwards."""
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http, grpc, metrics, log_path=log, **options)
    server.start()
    try:
        server.wait_ready(timeout=ready_timeout)
    except Exception:
        server.stop()
        print(log.read_text()[-5000:])
        raise
    yield server
    server.stop()


def engine_metrics(target) -> dict[str, float]:
    """The tritium_* values on a server's metrics endpoint (`target`: a TritonServer or its metrics port);
    the backend refreshes them every 0.2 s."""
    port = getattr(target, "metrics_port", target)
    with urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^tritium_(\w+)\{[^}]*\} (\S+)$", text, re.M)}


def wait_for_metrics(target, predicate, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = engine_metrics(target)
        if predicate(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)
