"""Reliability and security through a real tritonserver 2.51 on CPU (bundled SmolLM2): bad input, overload of the
KV cache and of the waiting queue, cancellation and disconnect, a killed stub, SIGTERM under load, a bounded
soak, and the restricted admin APIs.

Facts of tritonserver 2.51 these tests pin (checked here, see docs/SECURITY.md):
- the HTTP generate endpoints answer 400 for every model error whatever its code (`/infer` maps the codes,
  but refuses decoupled models), and gRPC streams carry only the message: the field name is in the message;
- a Python stub that dies is never restarted; its in-flight requests hang and later ones fail while the
  server reports ready. tools.serve watches the stubs and restarts tritonserver.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clients.grpc_stream import GrpcStreamClient
from tests.triton_helpers import engine_metrics, free_ports, wait_for_metrics
from tools.generate_repo import main as generate_repo
from tools.serve import ROOT, TritonServer, stub_processes

pytestmark = [pytest.mark.server, pytest.mark.slow]

KV_CACHE_MB = 8  # ~11 blocks of 16 tokens (SmolLM2 float32: 45 KiB of K+V per token): 176 tokens in all
MAX_WAITING = 16
SOAK_S = float(os.environ.get("TRITIUM_SOAK_S", "75"))


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, smollm2_dir):
    repo = tmp_path_factory.mktemp("reliability") / "repo"
    assert generate_repo(["--output-dir", str(repo), "--quiet", "--device", "cpu", "--kv-cache-mb", str(KV_CACHE_MB),
                          "--max-waiting-requests", str(MAX_WAITING)]) == 0
    return repo


@pytest.fixture(scope="module")
def server(tiny_repo, tmp_path_factory):
    http, grpc, metrics = free_ports(3)
    log = tmp_path_factory.mktemp("reliability-log") / "tritonserver.log"
    server = TritonServer(tiny_repo, http, grpc, metrics, log_path=log)
    server.start()
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()


# ---- clients -------------------------------------------------------------------------------------------------

def http_post(server, model: str, body: dict, endpoint: str = "generate", timeout: float = 60) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/{endpoint}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def grpc_tensor(name: str, value, datatype: str):
    array = np.array(value, dtype=np.object_ if datatype == "BYTES" else GRPC_DTYPES[datatype])
    array = array.reshape(1, -1) if array.ndim < 2 else array
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


GRPC_DTYPES = {"INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64, "FP32": np.float32, "BOOL": bool}
DEFAULT_TYPES = {"text_input": "BYTES", "stop_words": "BYTES", "bad_words": "BYTES", "embedding_bias_words": "BYTES",
                 "seed": "UINT64", "random_seed": "UINT64", "temperature": "FP32", "top_p": "FP32",
                 "repetition_penalty": "FP32", "presence_penalty": "FP32", "frequency_penalty": "FP32",
                 "length_penalty": "FP32", "stream": "BOOL", "exclude_input_in_output": "BOOL",
                 "return_context_logits": "BOOL"}


def grpc_call(server, model: str, inputs: dict, parameters: dict | None = None, timeout: float = 60):
    """(error message or None, text) of one streamed request; inputs: name -> value or (value, datatype)."""
    tensors = []
    for name, value in inputs.items():
        value, datatype = value if isinstance(value, tuple) else (value, DEFAULT_TYPES.get(name, "INT32"))
        if datatype == "BYTES":
            value = np.vectorize(lambda v: v if isinstance(v, bytes) else v.encode(), otypes=[object])(
                np.array(value if isinstance(value, list) else [value], dtype=object))
        tensors.append(grpc_tensor(name, value, datatype))
    with GrpcStreamClient(server.grpc_url, model=model) as client:
        text = ""
        try:
            for outputs in client.stream_tensors(tensors, parameters, timeout=timeout):
                text += "".join(t.decode() for t in outputs["text_output"].reshape(-1))
        except RuntimeError as exc:
            return str(exc), text
    return None, text


# ---- bad input -----------------------------------------------------------------------------------------------

@dataclass
class Bad:
    name: str
    inputs: dict  # merged over a good request; a value None removes the input
    field: str  # must appear in the error message
    http: bool = True  # JSON can carry it (NaN, raw bytes and explicit dtypes are gRPC only)
    ensemble: bool = True  # see test_ensemble_request_missing_a_required_input_is_answered_empty
    parameters: dict | None = None


GOOD = {"text_input": "Hello", "max_tokens": 4, "exclude_input_in_output": True}
LONG_PROMPT = "word " * 400  # ~400 tokens: more than the whole KV cache (176)
BAD_REQUESTS = [
    Bad("max_tokens zero", {"max_tokens": 0}, "max_tokens"),
    Bad("max_tokens negative", {"max_tokens": -5}, "max_tokens"),
    Bad("max_tokens over the context", {"max_tokens": 100000}, "max_tokens"),
    Bad("max_tokens missing", {"max_tokens": None}, "max_tokens", ensemble=False),
    Bad("max_tokens as FP32", {"max_tokens": (4.0, "FP32")}, "max_tokens", http=False),
    Bad("max_tokens batch of two", {"max_tokens": ([[4], [4]], "INT32")}, "max_tokens", http=False),
    Bad("top_p zero", {"top_p": 0.0}, "top_p"),
    Bad("top_p above one", {"top_p": 1.5}, "top_p"),
    Bad("top_p infinite", {"top_p": float("inf")}, "top_p", http=False),
    Bad("temperature negative", {"temperature": -0.5}, "temperature"),
    Bad("temperature NaN", {"temperature": float("nan")}, "temperature", http=False),
    Bad("top_k negative", {"top_k": -1}, "top_k"),
    Bad("seed as INT64 (negative)", {"seed": (-1, "INT64")}, "seed", http=False),
    Bad("min_tokens over max_tokens", {"min_tokens": 10, "max_tokens": 4}, "min_tokens"),
    Bad("min_length (old name) negative", {"min_length": -1}, "min_length"),
    Bad("repetition_penalty zero", {"repetition_penalty": 0.0}, "repetition_penalty"),
    Bad("presence_penalty too large", {"presence_penalty": 5.0}, "presence_penalty"),
    Bad("frequency_penalty too small", {"frequency_penalty": -3.0}, "frequency_penalty"),
    Bad("length_penalty NaN", {"length_penalty": float("nan")}, "length_penalty", http=False),
    Bad("beam search", {"beam_width": 2}, "beam_width"),
    Bad("too many sequences", {"num_return_sequences": 65}, "num_return_sequences"),
    Bad("end_id negative", {"end_id": -1}, "end_id"),
    Bad("end_id outside the vocabulary", {"end_id": 10_000_000}, "end_id"),
    Bad("text empty", {"text_input": ""}, "text_input"),
    Bad("text invalid UTF-8", {"text_input": b"\xff\xfe bad"}, "text_input", http=False),
    Bad("text longer than the KV cache", {"text_input": LONG_PROMPT}, "text_input"),
    Bad("text over 1 MiB", {"text_input": "a" * ((1 << 20) + 1)}, "text_input"),
    Bad("text missing", {"text_input": None}, "text_input", ensemble=False),
    Bad("text batch of two, one empty", {"text_input": ([[b"a"], [b""]], "BYTES"), "max_tokens": ([[4], [4]], "INT32"),
                                         "exclude_input_in_output": ([[True], [True]], "BOOL")}, "text_input",
        http=False),
    Bad("too many stop words", {"stop_words": [f"w{i}" for i in range(100)]}, "stop_words"),
    Bad("stop word too long", {"stop_words": ["x" * 1000]}, "stop_words"),
    Bad("too many bad words", {"bad_words": [f"w{i}" for i in range(40)]}, "bad_words"),
    Bad("stop word invalid UTF-8", {"stop_words": [b"\xc3"]}, "stop_words", http=False),
    Bad("context logits", {"return_context_logits": True}, "return_context_logits"),
    Bad("embedding bias", {"embedding_bias_words": ["x"]}, "embedding_bias_words"),
    Bad("stream as INT32", {"stream": (1, "INT32")}, "stream", http=False),
    Bad("apply_chat_template not a bool", {}, "apply_chat_template", parameters={"apply_chat_template": "maybe"}),
    Bad("ignore_eos not a bool", {}, "ignore_eos", parameters={"ignore_eos": "maybe"}),
]


def bad_inputs(case: Bad) -> dict:
    merged = {**GOOD, **case.inputs}
    return {k: v for k, v in merged.items() if v is not None}


def test_bad_requests_are_refused_naming_the_field_on_every_path_then_a_good_one_works(server):
    """Each bad request over gRPC streaming and HTTP generate, to the ensemble and to `llm` directly."""
    failures, checked = [], 0
    for case in BAD_REQUESTS:
        for model in ("ensemble", "llm") if case.ensemble else ("llm",):
            error, _ = grpc_call(server, model, bad_inputs(case), case.parameters)
            checked += 1
            if not error or case.field not in error:
                failures.append(f"grpc {model} {case.name}: {error!r}")
            if case.http:
                status, body = http_post(server, model, {**bad_inputs(case), **(case.parameters or {})})
                checked += 1
                if status != 400 or case.field not in body:
                    failures.append(f"http {model} {case.name}: {status} {body[:200]}")
    assert not failures, "\n".join(failures)
    assert checked >= 60
    for model in ("ensemble", "llm"):
        assert grpc_call(server, model, GOOD)[0] is None
        status, body = http_post(server, model, GOOD)
        assert status == 200 and json.loads(body)["text_output"]


@pytest.mark.xfail(strict=True, reason="tritonserver 2.51: an ensemble request missing a required input, with the "
                   "input count still in range, ends with an empty final response and no error (the step that "
                   "needs the input never runs); the engine model called directly refuses it")
@pytest.mark.parametrize("missing", ["text_input", "max_tokens"])
def test_ensemble_request_missing_a_required_input_is_refused(server, missing):
    error, _ = grpc_call(server, "ensemble", {k: v for k, v in GOOD.items() if k != missing})
    assert error and missing in error


def test_bad_requests_leave_running_requests_unharmed(server):
    good: dict = {}
    thread = threading.Thread(target=lambda: good.update(zip(("error", "text"), grpc_call(
        server, "ensemble", {**GOOD, "max_tokens": 32, "min_tokens": 32}))))
    thread.start()
    for case in [c for c in BAD_REQUESTS if c.http and c.ensemble][:10]:
        assert http_post(server, "ensemble", bad_inputs(case))[0] == 400, case.name
    thread.join(timeout=120)
    assert good["error"] is None and good["text"]
    solo = grpc_call(server, "ensemble", {**GOOD, "max_tokens": 32, "min_tokens": 32})
    assert solo == (None, good["text"])


# ---- overload ------------------------------------------------------------------------------------------------

FLOOD_PROMPTS = [f"Write a short poem about the number {n}." for n in range(12)]
CHAT = {"apply_chat_template": True}  # the instruct model answers a bare prompt with end-of-turn at once


def test_flood_of_four_times_the_kv_cache_completes_with_solo_outputs(server):
    """12 requests of ~4 blocks each (chat prompt ~30 tokens + 24) against 11 blocks: they queue and get preempted, all finish, and each
    greedy answer equals the same request run alone."""
    before = wait_for_metrics(server, lambda m: m["num_running"] == 0)
    assert before["kv_blocks_total"] <= 12
    results: dict[int, tuple] = {}
    peak_waiting = [0.0]

    def run(i: int) -> None:
        results[i] = grpc_call(server, "ensemble", {**GOOD, "text_input": FLOOD_PROMPTS[i], "max_tokens": 24},
                               CHAT, timeout=180)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(FLOOD_PROMPTS))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak_waiting[0] = max(peak_waiting[0], engine_metrics(server)["num_waiting"])
        time.sleep(0.2)
    solo = [grpc_call(server, "ensemble", {**GOOD, "text_input": p, "max_tokens": 24}, CHAT) for p in FLOOD_PROMPTS]
    assert all(results[i] == solo[i] and solo[i][0] is None and solo[i][1] for i in range(len(solo))), (results, solo)
    after = wait_for_metrics(server, lambda m: m["num_running"] == 0 and m["kv_blocks_used"] == 0)
    assert peak_waiting[0] > 0 or after["num_preemptions"] > before["num_preemptions"]
    assert after["kv_blocks_used"] == 0


def test_waiting_queue_bound_refuses_at_once_and_recovers(server):
    """Past max_waiting_requests a request is refused at once (UNAVAILABLE; tritonserver 2.51's generate
    endpoint turns every model error into HTTP 400, see the module docstring) with a message naming the
    bound; the engine's memory stays bounded and accepted requests finish."""
    statuses: list[tuple[int, float, str]] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        start = time.monotonic()
        status, body = http_post(server, "llm", {**GOOD, "text_input": f"Story {i}", "max_tokens": 40,
                                                  "min_tokens": 40}, timeout=300)
        with lock:
            statuses.append((status, time.monotonic() - start, body))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(MAX_WAITING + 14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    refused = [s for s in statuses if s[0] != 200]
    assert len(statuses) == MAX_WAITING + 14 and refused
    accepted_seconds = [seconds for status, seconds, _ in statuses if status == 200]
    for status, seconds, body in refused:
        assert status in (400, 503) and "max_waiting_requests" in body and "retry later" in body, body
        # at once: without waiting for a slot (2 shared cores under a full test run: 5.06 s was seen once)
        assert seconds < min(10.0, max(accepted_seconds)), (seconds, max(accepted_seconds))
    assert len(accepted_seconds) >= MAX_WAITING
    assert grpc_call(server, "ensemble", GOOD)[0] is None


# ---- cancellation and disconnect ---------------------------------------------------------------------------

def test_grpc_cancel_mid_stream_frees_every_block(server):
    wait_for_metrics(server, lambda m: m["num_running"] == 0)
    with GrpcStreamClient(server.grpc_url, model="llm") as client:
        stream = client.stream("Tell me a very long story.", 150, min_tokens=150)
        for _ in range(3):
            next(stream)
        # metrics are periodic (the engine process sends stats every 0.1 s, the backend pushes them every 0.2 s)
        busy = wait_for_metrics(server, lambda m: m["kv_blocks_used"] > 0, timeout=5)
        assert busy["kv_blocks_used"] > 0
        client.cancel()
        idle = wait_for_metrics(server, lambda m: m["num_running"] == 0 and m["kv_blocks_used"] == 0, timeout=5)
    assert idle["num_running"] == 0 and idle["num_waiting"] == 0 and idle["kv_blocks_used"] == 0
    assert idle["kv_blocks_free"] == idle["kv_blocks_total"]


def test_http_disconnect_mid_stream_frees_every_block(server):
    """The client closes its socket after three events of generate_stream; the engine must not generate the
    remaining ~145 tokens (counted in engine steps) and must end idle with every block free."""
    wait_for_metrics(server, lambda m: m["num_running"] == 0)
    connection = http.client.HTTPConnection("localhost", server.http_port, timeout=60)
    body = json.dumps({"text_input": "Tell me a very long story.", "max_tokens": 150, "min_tokens": 150,
                       "stream": True})
    connection.request("POST", "/v2/models/llm/generate_stream", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    events = 0
    while events < 3:
        events += response.readline().startswith(b"data:")
    steps_at_disconnect = engine_metrics(server)["steps"]
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    idle = wait_for_metrics(server, lambda m: m["num_running"] == 0 and m["kv_blocks_used"] == 0, timeout=30)
    assert idle["num_running"] == 0 and idle["kv_blocks_used"] == 0
    assert idle["kv_blocks_free"] == idle["kv_blocks_total"]
    assert idle["steps"] - steps_at_disconnect < 100, "the disconnected request ran on to its end"


# ---- soak ----------------------------------------------------------------------------------------------------

def process_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_soak_keeps_server_and_stub_memory_flat(server):
    """Continuous mixed traffic (streams, one-shot, bad requests, cancels) for SOAK_S seconds
    (TRITIUM_SOAK_S lengthens it): the RSS of tritonserver and of every stub must not keep growing."""
    pids = [server.process.pid] + list(server.stub_pids())
    stop = threading.Event()
    errors: list[str] = []

    def traffic(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            prompt = f"Give me fact number {n} about cats (worker {worker})."
            if n % 5 == 0:
                http_post(server, "ensemble", {**GOOD, "max_tokens": 0})
                continue
            error, text = grpc_call(server, "ensemble" if n % 2 else "llm", {**GOOD, "text_input": prompt,
                                                                           "max_tokens": 16}, CHAT)
            if error or not text:
                errors.append(error or "empty answer")

    workers = [threading.Thread(target=traffic, args=(w,)) for w in range(2)]
    for w in workers:
        w.start()
    samples = []
    deadline = time.monotonic() + SOAK_S
    try:
        while time.monotonic() < deadline:
            time.sleep(SOAK_S / 15)
            samples.append(sum(process_rss(p) for p in pids))
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)
    assert not errors, errors[:5]
    warm, late = samples[len(samples) // 3], max(samples[-len(samples) // 3:])
    growth = late - warm
    print(f"soak {SOAK_S:.0f} s: RSS after warm-up {warm / 2**20:.0f} MiB, late max {late / 2**20:.0f} MiB")
    assert growth < max(0.05 * warm, 64 << 20), f"RSS grew {growth / 2**20:.0f} MiB over the soak"


# ---- security ------------------------------------------------------------------------------------------------

HTTP_ADMIN = {  # restricted API -> (method, path) of one of its endpoints
    "model-repository": ("POST", "/v2/repository/index"),
    "model-config": ("GET", "/v2/models/llm/config"),
    "shared-memory": ("GET", "/v2/systemsharedmemory/status"),
    "statistics": ("GET", "/v2/models/stats"),
    "trace": ("GET", "/v2/trace/setting"),
    "logging": ("GET", "/v2/logging"),
}
GRPC_ADMIN = {
    "model-repository": lambda c, h: c.get_model_repository_index(headers=h),
    "model-config": lambda c, h: c.get_model_config("llm", headers=h),
    "shared-memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "statistics": lambda c, h: c.get_inference_statistics(headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
    "logging": lambda c, h: c.get_log_settings(headers=h),
}


def http_admin(server, method: str, path: str, headers: dict) -> int:
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_every_admin_api_is_refused_without_the_key_on_http_and_grpc(server):
    key = {"admin-key": server.admin_key}
    grpc_key = {"triton-grpc-protocol-admin-key": server.admin_key}  # gRPC metadata carries this prefix
    for api, (method, path) in HTTP_ADMIN.items():
        assert http_admin(server, method, path, {}) == 403, api
        assert http_admin(server, method, path, {"admin-key": "wrong"}) == 403, api
        assert http_admin(server, method, path, key) == 200, api
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for api, call in GRPC_ADMIN.items():
            with pytest.raises(Exception, match="restricted|admin-key|denied|PERMISSION|UNAVAILABLE") as info:
                call(client, None)
            assert "llm" not in str(info.value) or "restricted" in str(info.value).lower(), api
            call(client, grpc_key)  # works with the key
    finally:
        client.close()
    # Inference, health and metadata stay open.
    assert http_admin(server, "GET", "/v2/health/ready", {}) == 200
    assert http_admin(server, "GET", "/v2/models/ensemble", {}) == 200


def test_model_control_is_off_even_with_the_key(server):
    """--model-control-mode=none: nobody can load or unload a model, key or not."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/llm/unload", data=b"{}",
                                     method="POST", headers={"admin-key": server.admin_key})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code >= 400 and "explicit" in info.value.read().decode().lower()
    assert http_admin(server, "GET", "/v2/models/llm/ready", {}) == 200


# ---- faults and shutdown (the launcher, tools.serve, in its own process) ------------------------------------

class Launcher:
    """`python -m tools.serve` as a child, the way operators run it."""

    def __init__(self, repo, log_path, exit_timeout: int = 5):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "tools.serve", "--model-repository", str(repo), "--http-port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--exit-timeout-secs",
               str(exit_timeout), "--admin-key", "test-key"]
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc}"

    def server_pid(self) -> int | None:
        """The tritonserver child of the launcher (None while there is none)."""
        for stat in os.listdir("/proc"):
            if stat.isdigit():
                try:
                    fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
                    if int(fields[1]) == self.process.pid and "tritonserver" in open(f"/proc/{stat}/comm").read():
                        return int(stat)
                except OSError:
                    continue
        return None

    def wait_ready(self, timeout: float = 240, not_pid: int | None = None) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"launcher exited {self.process.returncode}"
            pid = self.server_pid()
            if pid and pid != not_pid and http_status(f"http://localhost:{self.http}/v2/health/ready") == 200:
                return pid
            time.sleep(0.5)
        raise TimeoutError("tritonserver not ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def http_status(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return type(exc).__name__


@pytest.fixture(scope="module")
def launcher(tiny_repo, tmp_path_factory):
    launcher = Launcher(tiny_repo, tmp_path_factory.mktemp("launcher") / "serve.log")
    try:
        launcher.wait_ready()
        yield launcher
    finally:
        launcher.stop()


def start_streams(url: str, count: int, max_tokens: int = 120) -> tuple[list[threading.Thread], dict]:
    """`count` long streams (alternately ensemble and llm) in threads; results: index -> (error, responses)."""
    results: dict[int, tuple] = {}

    def run(i: int) -> None:
        with GrpcStreamClient(url, model="llm" if i % 2 else "ensemble") as client:
            r = client.generate(f"Tell a long story number {i}.", max_tokens, min_tokens=max_tokens, timeout=90)
        results[i] = (r.error, len(r.responses))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads, results


def test_killed_stub_fails_its_requests_and_the_launcher_restarts_tritonserver(launcher):
    first = launcher.server_pid()
    threads, results = start_streams(launcher.grpc_url, 2)
    time.sleep(3)
    llm_stub = next(pid for pid, (name, _) in stub_processes(first).items() if name.startswith("llm"))
    os.kill(llm_stub, signal.SIGKILL)
    killed_at = time.monotonic()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a request hung after its stub was killed"
    assert time.monotonic() - killed_at < 45
    assert len(results) == 2 and all(error for error, _ in results.values()), results
    second = launcher.wait_ready(timeout=240, not_pid=first)
    assert second != first
    with GrpcStreamClient(launcher.grpc_url) as client:
        answer = client.generate("What is the capital of France?", 16, chat=True)
    assert answer.error is None and "Paris" in answer.text


def test_sigterm_under_load_exits_in_bounds_without_orphans(launcher):
    """Last in this file: stops the launcher. In-flight requests end (final response or error), the
    launcher exits within exit timeout + kill grace, and no stub of it survives."""
    from tools.serve import KILL_GRACE_S

    server_pid = launcher.server_pid()
    stubs = set(stub_processes(server_pid))
    threads, results = start_streams(launcher.grpc_url, 3)
    time.sleep(3)
    start = time.monotonic()
    launcher.process.send_signal(signal.SIGTERM)
    launcher.process.wait(timeout=5 + KILL_GRACE_S + 10)
    assert time.monotonic() - start < 5 + KILL_GRACE_S + 5
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and len(results) == 3, results
    time.sleep(1)
    alive = [pid for pid in stubs | {server_pid} if os.path.exists(f"/proc/{pid}")
             and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"processes left behind: {alive}"
