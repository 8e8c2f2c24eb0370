"""Load tests and metrics against a real tritonserver on CPU with the bundled SmolLM2: a short locust run over
HTTP (SSE) and gRPC streaming, the Prometheus metrics moving by exactly what was sent, and perf_analyzer
driving the ensemble with the TensorRT-LLM backend's inputs and vllm_model with the vLLM backend's.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.serving.metrics import ITL, REQUEST_LATENCY, TTFT, RequestRecorder
from backend.serving.session import SessionState
from clients.http_generate import generate, generate_stream
from perf import prometheus
from tests.triton_helpers import running_server
from tools.serve import BENCHMARK_RESTRICTED

ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).parent / "locust"
LOCUST_REQUESTS, LOCUST_TOKENS = 6, 8


@pytest.fixture(scope="module")
def server(model_repo, tmp_path_factory):
    """This module's own server (test_server.py's last test stops the session-wide one), with model-config and
    statistics open as perf_analyzer needs them (tools.serve.BENCHMARK_RESTRICTED)."""
    log = tmp_path_factory.mktemp("load-log") / "tritonserver.log"
    yield from running_server(model_repo, log, restricted=BENCHMARK_RESTRICTED)


def scrape(server) -> dict:
    return prometheus.scrape(f"localhost:{server.metrics_port}")


def test_recorder_counts_per_token_and_per_request():
    recorder = RequestRecorder()
    state = SessionState(arrival_ns=1_000_000_000, num_input_tokens=7)
    state.first_token_ns = state.last_token_ns = 1_500_000_000
    recorder.on_tokens(state, 2, previous_token_ns=0)  # two tokens in the first response
    previous, state.last_token_ns = state.last_token_ns, 1_800_000_000
    recorder.on_tokens(state, 3, previous)  # three more, 0.3 s after the last one
    state.num_output_tokens = 5
    recorder.on_finish(state, "success")
    recorder.on_finish(SessionState(num_input_tokens=2), "cancelled")
    recorder.on_rejected()
    recorder.on_finish(SessionState(num_input_tokens=4), "rejected")  # refused by the engine process
    observations, counts = recorder.take()
    assert [v for n, v in observations if n == TTFT] == [0.5]
    assert [round(v, 9) for n, v in observations if n == ITL] == [0.0, 0.1, 0.1, 0.1]
    assert len([v for n, v in observations if n == REQUEST_LATENCY]) == 1  # successes only
    assert counts[("tritium_prompt_tokens_total", "")] == 9
    assert counts[("tritium_generation_tokens_total", "")] == 5
    assert counts[("tritium_request_success_total", "")] == 1
    assert counts[("tritium_request_failure_total", "cancelled")] == 1
    assert counts[("tritium_request_failure_total", "rejected")] == 2
    assert recorder.take() == ([], {})  # taken once


def test_a_broken_off_perf_analyzer_export_keeps_the_requests_before_the_break():
    from perf.perf_analyzer import llm_metrics, load_export

    requests = [{"timestamp": i * 10**9, "response_timestamps": [i * 10**9 + 10**8 * k for k in (1, 2, 3)],
                 "response_outputs": [{"num_output_tokens": k} for k in (1, 2, 3)]} for i in range(3)]
    text = json.dumps({"experiments": [{"experiment": {"mode": "concurrency"}, "requests": requests}]}, indent=1)
    whole, complete = load_export(text)
    assert complete and llm_metrics(whole)["completed"] == 3
    cut = text[:text.rindex('"response_outputs"')]  # inside the third request
    broken, complete = load_export(cut)
    assert not complete and broken["experiments"][0]["requests"] == requests[:2]
    assert llm_metrics(broken)["output_tokens"] == 6
    # a garbage float written as a bare nan/inf (perf_analyzer on outputs a response does not carry) is null
    garbage = text.replace('"num_output_tokens": 1\n', '"num_output_tokens": 1, "cum_log_probs": -nan\n', 1)
    garbage = garbage.replace('"num_output_tokens": 2\n', '"num_output_tokens": 2, "x": [inf, -inf]\n', 1)
    assert garbage != text and load_export(garbage) == (json.loads(text.replace(
        '"num_output_tokens": 1\n', '"num_output_tokens": 1, "cum_log_probs": null\n', 1).replace(
        '"num_output_tokens": 2\n', '"num_output_tokens": 2, "x": [null, null]\n', 1)), True)


def send_requests(server) -> list[dict]:
    """Non-streamed and streamed requests of different lengths; each with its token counts and latency."""
    done = []
    for prompt, max_tokens in (("What is 2+2?", 3), ("Name a color.", 6), ("Tell me about Paris.", 9)):
        start = time.perf_counter()
        out = generate({"text_input": prompt, "max_tokens": max_tokens, "return_num_input_tokens": True,
                        "return_num_output_tokens": True}, server.http_url)
        done.append({"in": out["num_input_tokens"], "out": out["num_output_tokens"],
                     "latency": time.perf_counter() - start})
    for prompt, max_tokens in (("Write a haiku.", 7), ("Count to five.", 4)):
        start = time.perf_counter()
        events = list(generate_stream({"text_input": prompt, "max_tokens": max_tokens, "stream": True,
                                       "return_num_input_tokens": True, "return_num_output_tokens": True},
                                      server.http_url))
        done.append({"in": events[-1]["num_input_tokens"], "out": events[-1]["num_output_tokens"],
                     "latency": time.perf_counter() - start})
    return done


def reject_one(server) -> None:
    with pytest.raises(Exception, match="max_tokens"):
        generate({"text_input": "hi", "max_tokens": -1}, server.http_url, model="llm")


def wait_until_idle(server, timeout: float = 30.0) -> dict:
    """Metrics once nothing runs and two scrapes a flush apart agree (the exporter flushes every 0.2 s)."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        current = scrape(server)
        if prometheus.value(current, "tritium_num_running") == 0 and current == previous:
            return current
        previous = current
        time.sleep(0.5)
    raise AssertionError("the server did not go idle")


def test_metrics_move_by_exactly_what_was_sent(server):
    before = wait_until_idle(server)
    sent = send_requests(server)
    reject_one(server)
    after = wait_until_idle(server)

    def moved(name, **labels):
        return prometheus.delta(before, after, name, **labels)

    n, generated = len(sent), sum(r["out"] for r in sent)
    assert all(r["out"] >= 1 and r["in"] >= 1 for r in sent)
    assert moved("tritium_prompt_tokens_total") == sum(r["in"] for r in sent)
    assert moved("tritium_generation_tokens_total") == generated
    assert moved("tritium_request_success_total") == n
    assert moved("tritium_request_failure_total", reason="rejected") == 1
    for reason in ("error", "cancelled", "aborted"):
        assert moved("tritium_request_failure_total", reason=reason) == 0
    assert moved(f"{TTFT}_count") == n
    assert moved(f"{REQUEST_LATENCY}_count") == n
    assert moved(f"{ITL}_count") == generated - n  # one gap per token after the first
    for name in (TTFT, ITL, REQUEST_LATENCY):
        assert moved(f"{name}_bucket", le="+Inf") == moved(f"{name}_count")
    # The server's clock starts after the client's and stops before it: its sums are bounded by the client's.
    client_total = sum(r["latency"] for r in sent)
    assert 0 < moved(f"{TTFT}_sum") < moved(f"{REQUEST_LATENCY}_sum") < client_total
    assert prometheus.value(after, "tritium_kv_blocks_used") == 0
    assert prometheus.value(after, "tritium_kv_blocks_free") == prometheus.value(after, "tritium_kv_blocks_total") > 0
    assert moved("tritium_steps") >= max(r["out"] for r in sent)


def run_locust(locustfile: str, host: str, out: Path) -> list[dict]:
    command = [str(LOCUST), "-f", str(ROOT / "perf" / locustfile), "--host", host, "--headless", "-u", "2",
               "-r", "2", "-t", "90s", "--max-requests", str(LOCUST_REQUESTS), "--max-tokens", str(LOCUST_TOKENS),
               "--only-summary", "--json-file", str(out), "--loglevel", "WARNING"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(Path(f"{out}.json").read_text())


@pytest.mark.parametrize("locustfile, kind", [("locust_http.py", "STREAM"), ("locust_grpc.py", "GRPC")])
def test_short_locust_run_succeeds_and_reports_ttft(server, tmp_path, locustfile, kind):
    host = f"http://{server.http_url}" if kind == "STREAM" else server.grpc_url
    stats = {entry["method"]: entry for entry in run_locust(locustfile, host, tmp_path / "stats")}
    requests = stats[kind]
    assert requests["num_requests"] == LOCUST_REQUESTS and requests["num_failures"] == 0
    assert requests["total_content_length"] == LOCUST_REQUESTS * LOCUST_TOKENS  # fixed-length outputs
    for metric in ("TTFT", "ITL", "TOK/S"):
        assert stats[metric]["num_requests"] == LOCUST_REQUESTS and stats[metric]["num_failures"] == 0
    ttft_mean = stats["TTFT"]["total_response_time"] / LOCUST_REQUESTS
    latency_mean = requests["total_response_time"] / LOCUST_REQUESTS
    assert 0 < ttft_mean < latency_mean


@pytest.mark.parametrize("model, interface", [("ensemble", "trtllm"), ("vllm_model", "vllm")])
def test_perf_analyzer_drives_each_interface_as_its_clients_do(server, tmp_path, model, interface):
    """The ensemble with the TensorRT-LLM backend's inputs, and vllm_model with those genai-perf --backend vllm
    sends (sampling_parameters with string values)."""
    from perf.perf_analyzer import find_perf_analyzer, run_perf_analyzer

    try:
        find_perf_analyzer()
    except (OSError, subprocess.CalledProcessError, FileNotFoundError, StopIteration) as exc:
        pytest.skip(f"perf_analyzer could not be set up here (needs PyPI for tritonclient==2.51.0): {exc}")
    result = run_perf_analyzer(server.grpc_url, model, 2, ["What is ML?", "Name three colors."], max_tokens=6,
                               requests_per_window=2, workdir=tmp_path, timeout=240, interface=interface)
    assert result["returncode"] == 0, result["output"][-3000:]
    assert "error" not in result["output"].lower(), result["output"][-3000:]
    assert result["completed"] == result["requests"] >= 6
    # min_length / min_tokens (= max_tokens, as those clients send it for fixed lengths) fixes every output's length
    assert result["output_tokens"] == 6 * result["completed"]
    assert result["ttft_s"]["p50"] > 0 and result["itl_s"]["p50"] > 0
