"""`vllm_model` through a real tritonserver on CPU: requests as clients of Triton's vLLM backend send them (no batch
dimension, sampling_parameters as JSON), answers checked against the engine model and the offline engine.

(Named to run before test_server.py, whose last test stops the shared server.)
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from backend.engine.checkpoint import load_tokenizer
from backend.engine.config import EngineConfig
from backend.engine.engine import LLMEngine
from backend.engine.sampling_params import SamplingParams
from clients.grpc_stream import GrpcStreamClient
from tests.serving.test_reliability import http_post
from tests.triton_helpers import wait_for_metrics

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPT = "The capital of France is"


def vllm_inputs(prompt: str, sampling: dict | None = None, stream: bool = False, **flags) -> list:
    """Exactly as the vLLM backend's sample client builds them: shape [1], no batch dimension."""
    arrays = {"text_input": (np.array([prompt.encode()], dtype=np.object_), "BYTES"),
              "stream": (np.array([stream]), "BOOL")}
    if sampling is not None:
        arrays["sampling_parameters"] = (np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES")
    for name, value in flags.items():
        arrays[name] = (np.array([value]), "BOOL")
    tensors = []
    for name, (array, datatype) in arrays.items():
        tensors.append(grpcclient.InferInput(name, list(array.shape), datatype))
        tensors[-1].set_data_from_numpy(array)
    return tensors


def vllm_call(server, prompt: str, sampling: dict | None = None, stream: bool = False, **flags) -> list[dict]:
    with GrpcStreamClient(server.grpc_url, model="vllm_model") as client:
        return list(client.stream_tensors(vllm_inputs(prompt, sampling, stream, **flags)))


@pytest.fixture(scope="module")
def greedy_reference(smollm2_dir):
    """The offline engine's greedy answer to the raw prompt (vLLM sends prompts without a chat template)."""
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), device="cpu", dtype="float32", kv_cache_memory_mb=64))
    tokenizer = load_tokenizer(smollm2_dir)
    ids = engine.generate([tokenizer(PROMPT)["input_ids"]], [SamplingParams(max_tokens=12)])[0]
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_answer_streamed_or_not_equals_the_offline_engine(server, greedy_reference):
    whole = vllm_call(server, PROMPT, {"temperature": "0", "max_tokens": "12"})
    assert len(whole) == 1 and whole[0]["text_output"].tolist() == [(PROMPT + greedy_reference).encode()]
    streamed = vllm_call(server, PROMPT, {"temperature": 0, "max_tokens": 12}, stream=True)
    assert len(streamed) > 2 and all(r["text_output"].shape == (1,) for r in streamed)
    assert b"".join(r["text_output"][0] for r in streamed).decode() == greedy_reference
    status, body = http_post(server, "vllm_model", {"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": 12}})
    assert status == 200 and json.loads(body)["text_output"] == PROMPT + greedy_reference


def test_additional_outputs_as_vllm_sends_them(server, greedy_reference):
    flags = dict(return_finish_reason=True, return_cumulative_logprob=True, return_logprobs=True,
                 return_num_input_tokens=True, return_num_output_tokens=True)
    responses = vllm_call(server, PROMPT, {"temperature": 0, "max_tokens": 12, "logprobs": 1}, stream=True, **flags)
    last = responses[-1]
    assert [r["finish_reason"].tolist() for r in responses[:-1]] == [[b"None"]] * (len(responses) - 1)
    assert last["finish_reason"].tolist() == [b"length"]
    assert {int(r["num_input_tokens"][0]) for r in responses} == {5} and last["num_input_tokens"].dtype == np.uint32
    assert sum(int(r["num_output_tokens"][0]) for r in responses) == 12
    logprobs = [entry for r in responses for entry in json.loads(r["logprobs"][0])]
    assert len(logprobs) == 12 and all(len(e) == 1 for e in logprobs)
    chosen = [next(iter(e.values())) for e in logprobs]
    assert "".join(c["decoded_token"] for c in chosen) == greedy_reference
    assert float(last["cumulative_logprob"][0]) == pytest.approx(sum(c["logprob"] for c in chosen), abs=1e-4)
    assert all(c["logprob"] <= 0 for c in chosen)


def test_several_sequences_come_back_together_each_seeded_as_the_engine_model_would(server):
    """n = 2: each response carries both sequences (vLLM's layout); sequence i is what the engine model returns
    for one sequence seeded seed + i."""
    sampling = {"temperature": 1.0, "max_tokens": 10, "seed": 99, "n": 2}
    whole = vllm_call(server, PROMPT, sampling, exclude_input_in_output=True)
    texts = [t.decode() for t in whole[0]["text_output"]]
    expected = []
    for seed in (99, 100):
        with GrpcStreamClient(server.grpc_url, model="llm") as client:
            expected.append(client.generate(PROMPT, 10, temperature=1.0, seed=seed, stream=False).text)
    assert texts == expected and expected[0] != expected[1]
    streamed = vllm_call(server, PROMPT, sampling, stream=True)
    joined = ["".join(r["text_output"][i].decode() for r in streamed) for i in range(2)]
    assert all(r["text_output"].shape == (2,) for r in streamed) and joined == expected


def test_bad_parameters_name_themselves_and_the_model_goes_on(server):
    for sampling, field in (({"min_p": 0.5}, "min_p"), ({"max_tokens": 0}, "max_tokens"), ({"bogus": 1}, "bogus")):
        with pytest.raises(RuntimeError, match=field):
            vllm_call(server, PROMPT, sampling)
    status, body = http_post(server, "vllm_model", {"text_input": "Hi", "stream": True, "exclude_input_in_output": False})
    assert status == 400 and "exclude_input_in_output" in body
    assert vllm_call(server, PROMPT, {"temperature": 0, "max_tokens": 2})[0]["text_output"][0].startswith(PROMPT.encode())


def test_a_cancelled_stream_frees_the_engine_request(server):
    baseline = wait_for_metrics(server, lambda m: m["num_running"] == 0)
    with GrpcStreamClient(server.grpc_url, model="vllm_model") as client:
        stream = client.stream_tensors(vllm_inputs("Write a long story.", {"max_tokens": 400, "min_tokens": 400},
                                                   stream=True))
        for _ in range(3):
            next(stream)
        busy = wait_for_metrics(server, lambda m: m["num_running"] == 1)
        assert busy["kv_blocks_used"] > baseline["kv_blocks_used"]
        client.cancel()
        after = wait_for_metrics(server, lambda m: m["num_running"] == 0 and m["kv_blocks_used"] == 0, timeout=30)
    assert after["num_running"] == 0 and after["kv_blocks_used"] == 0
    generated = after["generation_tokens_total"] - baseline["generation_tokens_total"]
    assert 3 <= generated < 400  # stopped by the cancel, not by running to its 400 tokens
