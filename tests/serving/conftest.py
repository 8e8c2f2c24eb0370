"""One real tritonserver per test session, on a repository generated for the bundled SmolLM2 (CPU, float32)."""
from __future__ import annotations

import re
import socket
import time
import urllib.request

import pytest

from tools.generate_repo import main as generate_repo
from tools.serve import TritonServer


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory, smollm2_dir):
    repo = tmp_path_factory.mktemp("serving") / "model_repo"
    assert generate_repo(["--output-dir", str(repo), "--quiet", "--kv-cache-mb", "128", "--device", "cpu"]) == 0
    return repo


@pytest.fixture(scope="session")
def server(model_repo, tmp_path_factory):
    http, grpc, metrics = free_ports(3)
    log = tmp_path_factory.mktemp("serving-log") / "tritonserver.log"
    server = TritonServer(model_repo, http, grpc, metrics, log_path=log)
    server.start()
    try:
        server.wait_ready(timeout=240)
    except Exception:
        server.stop()
        print(log.read_text()[-5000:])
        raise
    yield server
    server.stop()


def engine_metrics(server: TritonServer) -> dict[str, float]:
    """The engine's statistics as the metrics endpoint shows them (refreshed every 0.2 s)."""
    with urllib.request.urlopen(f"http://localhost:{server.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^tritium_(\w+)\{[^}]*\} (\S+)$", text, re.M)}


def wait_for_metrics(server: TritonServer, predicate, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = engine_metrics(server)
        if predicate(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)
