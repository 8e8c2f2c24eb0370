"""End to end through a real tritonserver on CPU with the bundled SmolLM2: gRPC streaming, HTTP generate and
generate_stream, equality with the offline engine, text correctness, batching, errors, cancellation, shutdown.

The last test stops the shared server (shutdown under load), so it stays last in this file.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from backend.engine.checkpoint import load_tokenizer
from backend.engine.config import EngineConfig
from backend.engine.engine import LLMEngine
from backend.engine.sampling_params import SamplingParams
from backend.serving.preprocess import Preprocessor
from clients.grpc_stream import GrpcStreamClient, build_inputs, text_of
from clients.http_generate import GenerateError, generate, generate_stream
from tests.triton_helpers import wait_for_metrics

pytestmark = [pytest.mark.server, pytest.mark.slow]

FRANCE = "What is the capital of France?"
MULTILINGUAL = {  # prompt -> a character its greedy answer must contain, so the test means something
    "Translate to Chinese: I love you": "\u4f60-\u9fff",
    "Reply with three emojis about the sun.": "\U0001f300-\U0001faff",
    "Say 'crème brûlée' in a sentence.": "\u00c0-\u017f",
}


@pytest.fixture(scope="module")
def offline(smollm2_dir):
    """The same checkpoint in the test process, for reference answers."""
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), device="cpu", dtype="float32", kv_cache_memory_mb=64))
    pre = Preprocessor(load_tokenizer(smollm2_dir))

    def answer(prompts: list[str], max_tokens: int | list[int], chat: bool = True) -> list[str]:
        counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        ids = engine.generate([pre.encode(p, chat) for p in prompts], [SamplingParams(max_tokens=n) for n in counts])
        return [pre.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
    return answer


@pytest.fixture
def grpc(server):
    client = GrpcStreamClient(server.grpc_url)
    yield client
    client.close()


def http_body(prompt: str, max_tokens: int, **extra) -> dict:
    return {"text_input": prompt, "max_tokens": max_tokens, "exclude_input_in_output": True,
            "apply_chat_template": True, **extra}


def all_modes(server, grpc, prompt: str, max_tokens: int) -> dict[str, str]:
    """The same greedy request through every path: the texts must all be equal."""
    streamed = grpc.generate(prompt, max_tokens, chat=True)
    assert streamed.error is None, streamed.error
    events = list(generate_stream(http_body(prompt, max_tokens, stream=True), server.http_url))
    return {
        "grpc stream": streamed.text,
        "grpc one response": grpc.generate(prompt, max_tokens, chat=True, stream=False).text,
        "http generate": generate(http_body(prompt, max_tokens), server.http_url)["text_output"],
        "http generate_stream": "".join(e["text_output"] for e in events),
    }


def test_repository_loads_and_admin_apis_are_restricted(server):
    for model in ("ensemble", "preprocessing", "llm", "postprocessing", "vllm_model"):
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/ready") as response:
            assert response.status == 200
    index = f"http://{server.http_url}/v2/repository/index"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(index, data=b"{}", method="POST"))
    assert info.value.code == 403
    request = urllib.request.Request(index, data=b"{}", method="POST", headers={"admin-key": server.admin_key})
    with urllib.request.urlopen(request) as response:
        assert {m["name"] for m in json.loads(response.read())} >= {"ensemble", "llm"}


def test_capital_of_france_streams_paris(grpc):
    result = grpc.generate(FRANCE, 32, chat=True)
    assert result.error is None and "Paris" in result.text
    assert len(result.responses) > 2  # streamed token by token


def test_greedy_answers_equal_the_offline_engine_on_every_path(server, grpc, offline):
    prompts = [FRANCE, "Write a haiku about the sea."]
    for prompt, expected in zip(prompts, offline(prompts, 12)):
        assert all_modes(server, grpc, prompt, 12) == dict.fromkeys(
            ["grpc stream", "grpc one response", "http generate", "http generate_stream"], expected)


def test_streaming_equality_with_chinese_emoji_and_accents(server, grpc, offline):

    prompts = list(MULTILINGUAL)
    for prompt, expected in zip(prompts, offline(prompts, 16)):
        assert re.search(f"[{MULTILINGUAL[prompt]}]", expected), expected
        streamed = grpc.generate(prompt, 16, chat=True)
        deltas = [text_of(r) for r in streamed.responses]
        assert "".join(deltas) == expected
        assert grpc.generate(prompt, 16, chat=True, stream=False).text == expected
        assert not any("\ufffd" in d for d in deltas[:-1])  # the last may end in a truncated character


def test_text_output_is_one_string_per_response_as_nvidia_clients_read_it(grpc):
    """Shape [1], as the TensorRT-LLM backend's postprocessing sends it: NVIDIA's end_to_end_grpc_client.py decodes
    `as_numpy("text_output")[0]`, which failed on the [1, 1] array the ensemble returned before."""
    for stream in (True, False):
        result = grpc.generate(FRANCE, 12, chat=True, stream=stream)
        assert result.error is None and "Paris" in result.text
        texts = [r["text_output"] for r in result.responses if "text_output" in r]
        assert {t.shape for t in texts} == {(1,)}
        assert "".join(t[0].decode("utf-8") for t in texts) == result.text


def batch_tensors(prompts: list[str], max_tokens: list[int], stream: bool, min_tokens: int = 0) -> list:
    """One request carrying several prompts, stacked row by row as NVIDIA's end_to_end_grpc_client.py
    --batch-inputs stacks them."""
    rows = len(prompts)
    arrays = {"text_input": (np.array([[p.encode()] for p in prompts], dtype=np.object_), "BYTES"),
              "max_tokens": (np.array([[n] for n in max_tokens], dtype=np.int32), "INT32"),
              "min_tokens": (np.full((rows, 1), min_tokens, dtype=np.int32), "INT32"),
              "stream": (np.full((rows, 1), stream), "BOOL"),
              "exclude_input_in_output": (np.full((rows, 1), True), "BOOL")}
    tensors = []
    for name, (array, datatype) in arrays.items():
        tensors.append(grpcclient.InferInput(name, list(array.shape), datatype))
        tensors[-1].set_data_from_numpy(array)
    return tensors


@pytest.mark.parametrize("model", ["ensemble", "llm"])
def test_a_request_of_several_prompts_answers_each_with_its_batch_index(server, offline, model):
    """As the TensorRT-LLM backend does: each row generates on its own (with its own max_tokens), each response
    carries one row and its batch_index, and the last response is final; non-streamed, one response per row."""
    prompts, lengths = [FRANCE, "Write a haiku about the sea.", "Name a colour."], [12, 6, 9]
    expected = dict(enumerate(offline(prompts, lengths)))
    for stream in (True, False):
        texts: dict[int, str] = {}
        with GrpcStreamClient(server.grpc_url, model=model) as client:
            responses = list(client.stream_tensors(batch_tensors(prompts, lengths, stream),
                                                   {"apply_chat_template": True}))
        for outputs in responses:
            assert outputs["batch_index"].shape == (1, 1) and outputs["text_output"].size == 1
            index = int(outputs["batch_index"][0, 0])
            texts[index] = texts.get(index, "") + text_of(outputs)
        assert texts == expected, (stream, texts)
        if not stream:
            assert len(responses) == len(prompts)


def test_several_sequences_per_prompt_are_tagged_and_seeded_apart(server, grpc):
    """num_return_sequences as the TensorRT-LLM backend serves it: responses tagged sequence_index; a seeded
    request gives sequence i the seed + i, so each sequence equals a one-sequence request with that seed. With
    two prompts, each response carries both tags."""
    prompts, seed = ["Tell me a joke.", "Name a fruit."], 1234
    sampled = dict(temperature=1.0, chat=True, stream=False)
    alone = {(row, i): grpc.generate(p, 10, seed=seed + i, **sampled).text for row, p in enumerate(prompts)
             for i in range(3)}
    assert len(set(alone.values())) > 3  # the seeds give different answers, so the test can tell them apart
    for stream in (True, False):
        result = grpc.generate(prompts[0], 10, seed=seed, num_return_sequences=3, **{**sampled, "stream": stream})
        texts: dict[int, str] = {}
        for outputs in result.responses:
            assert "batch_index" not in outputs
            index = int(outputs["sequence_index"][0, 0])
            texts[index] = texts.get(index, "") + text_of(outputs)
        assert result.error is None and texts == {i: alone[0, i] for i in range(3)}, stream
    tensors = batch_tensors(prompts, [10, 10], stream=True)
    for name, array, datatype in (("num_return_sequences", np.array([[3], [3]], dtype=np.int32), "INT32"),
                                  ("temperature", np.array([[1.0], [1.0]], dtype=np.float32), "FP32"),
                                  ("seed", np.array([[seed], [seed]], dtype=np.uint64), "UINT64")):
        tensors.append(grpcclient.InferInput(name, list(array.shape), datatype))
        tensors[-1].set_data_from_numpy(array)
    both: dict[tuple[int, int], str] = {}
    for outputs in grpc.stream_tensors(tensors, {"apply_chat_template": True}):
        key = int(outputs["batch_index"][0, 0]), int(outputs["sequence_index"][0, 0])
        both[key] = both.get(key, "") + text_of(outputs)
    assert both == alone


def test_eight_concurrent_streams_complete_in_shared_batches(server, offline):
    prompts = [f"Count from 1 to {n}." for n in range(3, 11)]
    lengths = [10 + 2 * i for i in range(8)]
    expected = offline(prompts, lengths)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        with GrpcStreamClient(server.grpc_url) as client:
            results[i] = client.generate(prompts[i], lengths[i], chat=True, return_num_output_tokens=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    for i in range(8):
        result = results[i]
        assert result.error is None and result.text == expected[i], (i, result.text, expected[i])
        assert 0 < int(result.responses[-1]["num_output_tokens"][0, 0]) <= lengths[i]
    # metrics are periodic (engine process stats every 0.1 s, pushed to Triton every 0.2 s)
    assert wait_for_metrics(server, lambda m: m["max_batch_size_seen"] >= 4, timeout=5)["max_batch_size_seen"] >= 4


def test_stop_words_across_token_boundaries_are_cut(server, grpc):
    streamed = grpc.generate(FRANCE, 32, chat=True, stop_words=["is Par"])
    assert streamed.error is None and streamed.text == "The capital of France "
    whole = generate(http_body(FRANCE, 32, stop_words=["is Par", "never"]), server.http_url)
    assert whole["text_output"] == "The capital of France "


def test_prompt_is_prepended_unless_excluded(server):
    body = {"text_input": FRANCE, "max_tokens": 16, "apply_chat_template": True}
    echoed = generate(body, server.http_url)["text_output"]
    plain = generate({**body, "exclude_input_in_output": True}, server.http_url)["text_output"]
    assert echoed == FRANCE + plain and "Paris" in plain


def test_min_tokens_logprobs_counts_and_seed(server, grpc):
    body = {"text_input": FRANCE, "max_tokens": 12, "exclude_input_in_output": True, "min_length": 10,
            "return_log_probs": True, "return_num_output_tokens": True, "return_num_input_tokens": True}
    out = generate(body, server.http_url)
    n = out["num_output_tokens"]
    assert 10 <= n <= 12 and out["num_input_tokens"] == 7
    assert len(out["output_log_probs"]) == n and all(lp <= 0 for lp in out["output_log_probs"])
    assert out["cum_log_probs"] == pytest.approx(sum(out["output_log_probs"]), rel=1e-4)
    sampled = [grpc.generate("Tell me a joke.", 12, chat=True, temperature=1.0, seed=1234).text for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0]
    alias = generate(http_body("Tell me a joke.", 12, temperature=1.0, random_seed=1234), server.http_url)
    assert alias["text_output"] == sampled[0]


def test_perf_metrics_fields(grpc):
    result = grpc.generate(FRANCE, 8, chat=True, return_perf_metrics=True, stream=False)
    out = result.responses[-1]
    arrival, first, last = (int(out[k][0, 0]) for k in ("arrival_time_ns", "first_token_time_ns", "last_token_time_ns"))
    assert 0 < arrival <= first <= last
    assert int(out["kv_cache_alloc_new_blocks"][0, 0]) + int(out["kv_cache_reused_blocks"][0, 0]) >= 1


def test_malformed_requests_get_clear_errors_and_the_server_goes_on(server, grpc):
    with pytest.raises(GenerateError, match="text_input"):
        generate({"max_tokens": 8}, server.http_url)
    result = grpc.generate(FRANCE, 0)
    assert result.error and "max_tokens: must be >= 1, got 0" in result.error
    result = grpc.generate(FRANCE, 8, top_p=1.5)
    assert result.error and "top_p" in result.error
    wrong = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.array([[8.0]], dtype=np.float32))
    inputs = [wrong if i.name() == "max_tokens" else i for i in build_inputs(FRANCE, 8)]
    with pytest.raises(RuntimeError, match="max_tokens"):
        list(grpc.stream_tensors(inputs))
    assert "Paris" in grpc.generate(FRANCE, 16, chat=True).text


def test_engine_model_called_directly_with_text_equals_the_ensemble(server, grpc):
    with GrpcStreamClient(server.grpc_url, model="llm") as direct:
        result = direct.generate(FRANCE, 16, chat=True, stop_words=["is Par"], return_num_output_tokens=True)
    assert result.error is None and result.text == grpc.generate(FRANCE, 16, chat=True, stop_words=["is Par"]).text


@pytest.mark.parametrize("rows", [1, 2])
def test_cancelled_grpc_stream_frees_its_kv_blocks(server, rows):
    """Cancellation reaches the engine on the engine model's own stream: tritonserver 2.51 does not propagate
    a cancelled ensemble request into its running steps (see README). Every row of a request stops."""
    baseline = wait_for_metrics(server, lambda m: m["num_running"] == 0)
    story = "Write a long story about a dragon."
    with GrpcStreamClient(server.grpc_url, model="llm") as client:
        tensors = batch_tensors([story] * rows, [400] * rows, stream=True, min_tokens=400)  # minutes
        stream = client.stream_tensors(tensors, {"apply_chat_template": True})
        for _ in range(3):
            next(stream)
        busy = wait_for_metrics(server, lambda m: m["num_running"] == rows)
        assert busy["num_running"] == rows and busy["kv_blocks_used"] > baseline["kv_blocks_used"]
        client.cancel()
        after = wait_for_metrics(server, lambda m: m["num_running"] == 0 and m["kv_blocks_used"] == 0)
    assert after["num_running"] == 0 and after["kv_blocks_used"] == 0
    with GrpcStreamClient(server.grpc_url) as client:
        assert "Paris" in client.generate(FRANCE, 16, chat=True).text


def test_a_stop_request_aborts_the_running_request_with_its_id(server):
    """The TensorRT-LLM backend's stop input, on the engine model: what vllm_model cancels with."""
    wait_for_metrics(server, lambda m: m["num_running"] == 0)
    stop = grpcclient.InferInput("stop", [1, 1], "BOOL")
    stop.set_data_from_numpy(np.array([[True]]))
    with GrpcStreamClient(server.grpc_url, model="llm") as client, \
            GrpcStreamClient(server.grpc_url, model="llm") as stopper:
        stream = client.stream("Write a long story about a dragon.", 400, chat=True, min_tokens=400,
                               request_id="story-1")
        next(stream)
        assert list(stopper.stream_tensors(build_inputs("", 1) + [stop], request_id="story-1")) == []
        rest = list(stream)
    assert rest[-1]["finish_reason"][0, 0] == b"abort"
    assert wait_for_metrics(server, lambda m: m["num_running"] == 0)["num_running"] == 0


def test_shutdown_under_load_is_bounded_and_clients_do_not_hang(server):
    """Last: SIGTERM with streams in flight. tritonserver 2.51 refuses new requests while it drains, and that
    includes the ensemble's own postprocessing steps, so an in-flight ensemble stream cannot finish: the drain
    runs to --exit-timeout-secs, then tritonserver exits 1 (or hangs in its gRPC teardown, or aborts).
    tools.serve bounds it: SIGKILL KILL_GRACE_S after the exit timeout. The clients get errors, not hangs."""
    from tools.serve import KILL_GRACE_S

    results: list = []

    def run() -> None:
        with GrpcStreamClient(server.grpc_url) as client:
            results.append(client.generate("Write a long story.", 200, chat=True, min_tokens=200, timeout=120))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for_metrics(server, lambda m: m["num_running"] == 2)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < server.exit_timeout + KILL_GRACE_S + 5
    assert server.process.poll() is not None
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert len(results) == 2 and all(r.error for r in results)
