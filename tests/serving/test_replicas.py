"""Two instances of the engine model (replicas, here on CPU): each reports its own series on the metrics
endpoint, and the requests sent are all accounted for across them."""
from __future__ import annotations

import threading
import time

import pytest

from perf import prometheus
from tests.triton_helpers import running_server
from tools.generate_repo import main as generate_repo

pytestmark = [pytest.mark.server]
REQUESTS = 8


@pytest.fixture(scope="module")
def two_instance_server(tmp_path_factory, smollm2_dir):
    repo = tmp_path_factory.mktemp("replicas") / "model_repo"
    assert generate_repo(["--output-dir", str(repo), "--quiet", "--kv-cache-mb", "64", "--device", "cpu",
                          "--instances", "2", "--instance-kind", "cpu"]) == 0
    yield from running_server(repo, tmp_path_factory.mktemp("replicas-log") / "tritonserver.log")


def test_each_instance_has_its_own_series_and_every_request_is_counted(two_instance_server):
    from clients.grpc_stream import GrpcStreamClient

    server = two_instance_server
    url = f"localhost:{server.metrics_port}"
    before = prometheus.scrape(url)
    instances = {dict(labels)["instance"] for name, labels in before if name == "tritium_num_running"}
    assert len(instances) == 2, instances

    errors: list[str] = []

    def ask(i: int) -> None:
        with GrpcStreamClient(server.grpc_url, "llm") as client:
            result = client.generate(f"Count to {i}:", 8, min_tokens=8)
            if result.error or not result.text:
                errors.append(result.error or "empty text")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    per_instance = wait_for_successes(url, before, instances)
    assert sum(per_instance.values()) == REQUESTS, per_instance
    print("requests per instance:", per_instance)


def wait_for_successes(url: str, before: dict, instances: set[str], timeout: float = 10.0) -> dict[str, float]:
    """Per-instance success counts since `before`, once they add up (the backend flushes every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        after = prometheus.scrape(url)
        counts = {name: prometheus.delta(before, after, "tritium_request_success_total", instance=name)
                  for name in instances}
        if sum(counts.values()) >= REQUESTS or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)
