"""The vLLM backend's interface without a server (backend/serving/vllm_interface.py): sampling_parameters onto
the engine model's inputs, and engine responses folded into vLLM's tensors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from backend.engine.errors import InvalidParameterError
from backend.serving.vllm_interface import EngineDelta, VllmResponses, engine_delta, parse_vllm_request

NO_FLAGS = dict.fromkeys(["return_finish_reason", "return_cumulative_logprob", "return_logprobs",
                          "return_num_input_tokens", "return_num_output_tokens"], False)
ALL_FLAGS = dict.fromkeys(NO_FLAGS, True)


def parse(sampling=None, stream=False, exclude=None, parameters=None, flags=NO_FLAGS):
    text = None if sampling is None else sampling if isinstance(sampling, str) else json.dumps(sampling)
    return parse_vllm_request("Hello", stream, exclude, text, parameters, dict(flags))


def engine_value(request, name):
    return request.engine_inputs[name].reshape(-1)[0]


def test_vllm_defaults_and_string_values():
    request = parse()
    assert engine_value(request, "max_tokens") == 16 and engine_value(request, "temperature") == 1.0
    assert request.prepend_input and not request.stream and request.num_sequences == 1
    assert engine_value(request, "stream") and engine_value(request, "exclude_input_in_output")
    assert request.engine_parameters == {"apply_chat_template": False}
    request = parse({"temperature": "0.1", "top_p": "0.95", "max_tokens": "100", "top_k": -1, "seed": "7",
                     "n": 2, "stop": "\n", "ignore_eos": "true", "min_p": 0, "skip_special_tokens": True})
    assert engine_value(request, "max_tokens") == 100 and engine_value(request, "top_k") == 0
    assert engine_value(request, "temperature") == pytest.approx(0.1) and engine_value(request, "top_p") == pytest.approx(0.95)
    assert engine_value(request, "seed") == 7 and request.engine_inputs["seed"].dtype == np.uint64
    assert engine_value(request, "num_return_sequences") == 2 and request.num_sequences == 2
    assert request.engine_inputs["stop_words"].tolist() == [[b"\n"]]
    assert request.engine_parameters["ignore_eos"] is True


def test_streaming_excludes_the_prompt_and_may_not_ask_for_it():
    assert not parse(stream=True).prepend_input
    assert not parse(exclude=True).prepend_input
    with pytest.raises(InvalidParameterError, match="exclude_input_in_output: false is not allowed when streaming"):
        parse(stream=True, exclude=False)


def test_request_parameters_are_read_when_there_is_no_tensor():
    """The generate endpoint's `parameters` share Triton's namespace: only sampling keys are taken from there."""
    request = parse(parameters=json.dumps({"temperature": 0, "max_tokens": 5, "stream": False,
                                           "triton_enable_empty_final_response": True}))
    assert engine_value(request, "temperature") == 0 and engine_value(request, "max_tokens") == 5
    assert engine_value(parse({"max_tokens": 3}, parameters=json.dumps({"max_tokens": 5})), "max_tokens") == 3


@pytest.mark.parametrize("sampling, message", [
    ({"min_p": 0.1}, "sampling_parameters.min_p: is not supported"),
    ({"best_of": 2}, "sampling_parameters.best_of: is not supported"),
    ({"stop_token_ids": [2]}, "sampling_parameters.stop_token_ids: is not supported"),
    ({"frobnicate": 1}, "sampling_parameters: unknown sampling parameter 'frobnicate'"),
    ({"max_tokens": "many"}, "sampling_parameters.max_tokens: must be an integer, got 'many'"),
    ({"max_tokens": 2.5}, "sampling_parameters.max_tokens: must be an integer"),
    ({"temperature": True}, "sampling_parameters.temperature: must be a number"),
    ({"ignore_eos": "maybe"}, "sampling_parameters.ignore_eos: must be true or false"),
    ({"logprobs": 5}, "sampling_parameters.logprobs: only the sampled token"),
    ({"stop": [1, 2]}, "sampling_parameters.stop: must be a string or a list of strings"),
    ("{not json", "sampling_parameters: is not valid JSON"),
    ("[1, 2]", "sampling_parameters: must be a JSON object, got list"),
])
def test_what_the_engine_cannot_do_is_refused_naming_the_parameter(sampling, message):
    with pytest.raises(InvalidParameterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(sampling)


def delta(sequence, text, tokens, finish=None, count=None, cum=None, logprobs=(), ids=()):
    return EngineDelta(sequence, text, finish, 3, count, cum, list(logprobs), list(ids))


def test_two_streamed_sequences_fold_into_vllm_tensors():
    request = parse({"n": 2, "logprobs": 1}, stream=True, flags=ALL_FLAGS)
    folded = VllmResponses(request, decode_token=lambda t: f"<{t}>")
    first = folded.add(delta(1, " b", 1, count=1, cum=-0.5, logprobs=[-0.5], ids=[11]))
    assert first["text_output"].tolist() == [b"", b" b"] and first["num_output_tokens"].tolist() == [0, 1]
    assert first["finish_reason"].tolist() == [b"None", b"None"] and first["num_input_tokens"].tolist() == [3]
    assert [json.loads(x) for x in first["logprobs"]] == [[], [{"11": {"logprob": -0.5, "rank": None,
                                                                        "decoded_token": "<11>"}}]]
    assert first["cumulative_logprob"].dtype == np.float32 and first["cumulative_logprob"].tolist() == [0.0, -0.5]
    folded.add(delta(0, " a", 2, finish="length", count=2, cum=-1.0, logprobs=[-0.25, -0.75], ids=[5, 6]))
    assert not folded.finished
    last = folded.add(delta(1, "!", 1, finish="stop", count=2, cum=-0.75, logprobs=[-0.25], ids=[12]))
    assert folded.finished and last["finish_reason"].tolist() == [b"length", b"stop"]
    assert last["num_output_tokens"].tolist() == [0, 1] and last["cumulative_logprob"].tolist() == [-1.0, -0.75]


def test_a_non_streamed_answer_is_the_prompt_then_the_whole_text():
    request = parse({"logprobs": 0}, flags=dict(NO_FLAGS, return_logprobs=True, return_num_output_tokens=True))
    folded = VllmResponses(request, decode_token=str)
    assert folded.add(delta(0, " wor", 1, count=1, logprobs=[-1.0], ids=[1])) is None
    folded.add(delta(0, "ld", 1, finish="stop", count=2, logprobs=[-2.0], ids=[2]))
    whole = folded.whole()
    assert whole["text_output"].tolist() == [b"Hello world"] and whole["num_output_tokens"].tolist() == [2]
    assert [list(d) for d in json.loads(whole["logprobs"][0])] == [["1"], ["2"]]
    assert set(whole) == {"text_output", "logprobs", "num_output_tokens"}  # only what was asked for
    unasked = VllmResponses(parse(flags=dict(NO_FLAGS, return_logprobs=True)), decode_token=str)
    unasked.add(delta(0, "x", 1, finish="stop", count=1))
    assert unasked.whole()["logprobs"].tolist() == [b"null"]  # as vLLM sends it without sampling logprobs


def test_engine_responses_are_read_from_their_tensors():
    arrays = {"text_output": np.array([[b"hi"]], dtype=np.object_), "finish_reason": np.array([[b""]], dtype=np.object_),
              "num_output_tokens": np.array([[4]], dtype=np.int32), "sequence_index": np.array([[2]], dtype=np.int32),
              "output_log_probs": np.array([[[-0.5, -0.25]]], dtype=np.float32),
              "output_ids": np.array([[7, 8]], dtype=np.int32)}
    read = engine_delta(arrays)
    assert (read.sequence, read.text, read.finish_reason, read.num_output_tokens) == (2, "hi", None, 4)
    assert read.log_probs == [-0.5, -0.25] and read.token_ids == [7, 8] and read.cum_log_prob is None
