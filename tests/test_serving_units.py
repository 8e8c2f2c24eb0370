"""Serving pieces without a server: request parsing, the response session (fake engine), engine settings,
preprocessing."""
from __future__ import annotations

import queue

import numpy as np
import pytest

from backend.engine.config import EngineConfig
from backend.engine.errors import InvalidParameterError
from backend.engine.outputs import RequestOutput
from backend.serving.engine_settings import from_parameters, to_parameters
from backend.serving.preprocess import Preprocessor, parse_bool_parameter
from backend.serving.request_parser import parse_request
from backend.serving.session import Session


def tensors(**values) -> dict[str, np.ndarray]:
    out = {"input_ids": np.array([[1, 2, 3]], dtype=np.int32), "max_tokens": np.array([[8]], dtype=np.int32)}
    for name, value in values.items():
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, bool):
            out[name] = np.array([[value]], dtype=bool)
        elif isinstance(value, float):
            out[name] = np.array([[value]], dtype=np.float32)
        elif isinstance(value, str):
            out[name] = np.array([[value.encode()]], dtype=np.object_)
        elif isinstance(value, list):
            out[name] = np.array([[v.encode() for v in value]], dtype=np.object_)
        else:
            out[name] = np.array([[value]], dtype=np.uint64 if "seed" in name else np.int32)
    return out


# ---- request parsing ---------------------------------------------------------------------------------------

def test_defaults_are_greedy_non_streaming_with_echo():
    req = parse_request(tensors(text_input="Hi"))
    assert req.prompt_ids == [1, 2, 3] and req.params.max_tokens == 8 and req.params.greedy
    assert not req.stream and req.echo_text == "Hi"


def test_echo_only_when_not_streaming_and_not_excluded():
    assert parse_request(tensors(text_input="Hi", exclude_input_in_output=True)).echo_text == ""
    assert parse_request(tensors(text_input="Hi", stream=True)).echo_text == ""


def test_genai_perf_aliases():
    req = parse_request(tensors(min_length=5, random_seed=42))
    assert req.params.min_tokens == 5 and req.params.seed == 42
    req = parse_request(tensors(min_tokens=3, seed=7))
    assert req.params.min_tokens == 3 and req.params.seed == 7


@pytest.mark.parametrize("values, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(beam_width=2), "beam_width"),
    (dict(num_return_sequences=65), "num_return_sequences"),
    (dict(return_context_logits=True), "return_context_logits"),
    (dict(return_generation_logits=True), "return_generation_logits"),
    (dict(embedding_bias_words=["foo"], embedding_bias_weights=np.array([[1.0]], dtype=np.float32)),
     "embedding_bias_words"),
    (dict(max_tokens=np.array([[1.5]], dtype=np.float32)), "max_tokens"),
    (dict(temperature=np.array([[0.1, 0.2]], dtype=np.float32)), "temperature"),
    (dict(text_input=np.array([[b"\xff\xfe"]], dtype=np.object_)), "text_input"),
])
def test_bad_values_name_the_field(values, field):
    with pytest.raises(InvalidParameterError) as info:
        parse_request(tensors(**values))
    assert info.value.field == field and str(info.value).startswith(field)


def test_missing_inputs_name_the_field():
    with pytest.raises(InvalidParameterError, match="input_ids"):
        parse_request({"max_tokens": np.array([[4]], dtype=np.int32)})
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        parse_request({"input_ids": np.array([[1]], dtype=np.int32)})


def test_batch_of_two_prompts_is_rejected():
    with pytest.raises(InvalidParameterError, match="batch size must be 1"):
        parse_request(tensors(input_ids=np.array([[1, 2], [3, 4]], dtype=np.int32)))


def test_stop_and_bad_words():
    ids = np.array([[[5, 6, 7, 0], [2, 3, -1, -1]]], dtype=np.int32)
    req = parse_request(tensors(stop_words=["</s>", "", "\n\n"], bad_words_ids=ids))
    assert req.stop_strings == ["</s>", "\n\n"]
    assert req.params.bad_token_sequences == [[5, 6], [7]]


def test_ignore_eos_parameter():
    assert parse_request(tensors(), {"ignore_eos": True}).params.ignore_eos
    assert parse_request(tensors(), {"ignore_eos": "true"}).params.ignore_eos
    with pytest.raises(InvalidParameterError, match="ignore_eos"):
        parse_request(tensors(), {"ignore_eos": "maybe"})


# ---- the response session ---------------------------------------------------------------------------------

class FakeTokenizer:
    backend_tokenizer = None
    words = ["<eos>", "Hello", " world", ",", " how", " are", " you", "?", " I", " am"]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.words[i] for i in ids if not (skip_special_tokens and i == 0))


class FakeEngine:
    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)


class FakeStream:
    """Outputs as the engine would deliver them; `paced` makes each arrive after the session asks (one per
    response), otherwise all are ready at once and the session coalesces them."""

    def __init__(self, outputs, paced=True):
        self._queue = queue.Queue()
        self.paced = paced
        for out in outputs:
            self._queue.put(out)

    def get(self, timeout=None):
        if self.paced and timeout == 0:
            raise queue.Empty
        return self._queue.get(timeout=timeout)


class RecordingSink:
    def __init__(self, cancel_after: int | None = None):
        self.sent, self.errors, self.error_codes, self.polls = [], [], [], 0
        self.cancel_after = cancel_after

    def send(self, outputs, final):
        self.sent.append((outputs, final))

    def send_error(self, message, code_name="INTERNAL"):
        self.errors.append(message)
        self.error_codes.append(code_name)

    def is_cancelled(self):
        self.polls += 1
        return self.cancel_after is not None and self.polls > self.cancel_after


def engine_outputs(tokens: list[int], finish="stop", logprobs=False) -> list[RequestOutput]:
    outs = []
    for i, t in enumerate(tokens):
        last = i == len(tokens) - 1
        outs.append(RequestOutput("r", [t], [-0.5] if logprobs else None, last, finish if last else None,
                                  num_prompt_tokens=3, num_output_tokens=i + 1))
    return outs


def run_session(tokens, stream, cancel_after=None, paced=True, **request_values):
    request = parse_request(tensors(stream=stream, exclude_input_in_output=True, **request_values))
    engine, sink = FakeEngine(), RecordingSink(cancel_after)
    outputs = engine_outputs(tokens, logprobs=request.return_log_probs)
    Session(engine, "r", request, FakeStream(outputs, paced), sink, block_size=16).run()
    return sink, engine


def text(outputs) -> str:
    return outputs["text_output"][0, 0].decode()


def test_streaming_sends_deltas_and_final_on_last_data_response():
    sink, _ = run_session([1, 2, 3, 4, 5, 6, 7, 0], stream=True)
    assert [final for _, final in sink.sent] == [False] * (len(sink.sent) - 1) + [True]
    assert "".join(text(o) for o, _ in sink.sent) == "Hello world, how are you?"
    assert text(sink.sent[-1][0]) == "" and sink.sent[-1][0]["finish_reason"][0, 0] == b"stop"


def test_outputs_ready_together_are_coalesced_into_one_response():
    sink, _ = run_session([1, 2, 3, 4, 5, 6, 7, 0], stream=True, paced=False)
    assert len(sink.sent) == 1 and sink.sent[0][1] is True
    assert text(sink.sent[0][0]) == "Hello world, how are you?"


def test_non_streaming_sends_exactly_one_final_response_equal_to_stream():
    sink, _ = run_session([1, 2, 3, 4, 5, 6, 7, 0], stream=False, return_num_output_tokens=True,
                          return_num_input_tokens=True)
    assert len(sink.sent) == 1 and sink.sent[0][1] is True
    outputs = sink.sent[0][0]
    assert text(outputs) == "Hello world, how are you?"
    assert outputs["num_output_tokens"][0, 0] == 8 and outputs["num_input_tokens"][0, 0] == 3


def test_stop_string_aborts_the_engine_request_and_is_cut():
    for stream in (True, False):
        sink, engine = run_session([1, 2, 3, 4, 5, 6, 7], stream=stream, stop_words=["w are"])
        assert engine.aborted == ["r"]
        assert "".join(text(o) for o, _ in sink.sent) == "Hello world, ho"
        assert sink.sent[-1][1] is True and sink.sent[-1][0]["finish_reason"][0, 0] == b"stop"


def test_log_probs_and_perf_fields():
    sink, _ = run_session([1, 2, 3, 0], stream=False, return_log_probs=True, return_perf_metrics=True)
    outputs = sink.sent[0][0]
    assert outputs["output_log_probs"].shape == (1, 1, 4)
    assert outputs["cum_log_probs"][0, 0] == pytest.approx(-2.0)
    assert outputs["first_token_time_ns"][0, 0] >= outputs["arrival_time_ns"][0, 0] > 0
    assert outputs["last_token_time_ns"][0, 0] >= outputs["first_token_time_ns"][0, 0]


def test_cancellation_aborts_and_ends_with_an_error():
    request = parse_request(tensors(stream=True))
    engine, sink = FakeEngine(), RecordingSink(cancel_after=0)
    Session(engine, "r", request, FakeStream([]), sink, block_size=16).run()  # nothing ever arrives
    assert engine.aborted == ["r"] and sink.errors == ["request cancelled by the client"]


def test_engine_error_becomes_an_error_response():
    request = parse_request(tensors(stream=True))
    failed = RequestOutput("r", [], None, True, "error", error="engine step failed: boom")
    engine, sink = FakeEngine(), RecordingSink()
    Session(engine, "r", request, FakeStream([failed]), sink, block_size=16).run()
    assert sink.errors == ["generation failed: engine step failed: boom"]


# ---- engine settings and preprocessing ----------------------------------------------------------------------

def test_engine_settings_round_trip():
    config = EngineConfig(model="ckpt", max_num_seqs=7, kv_cache_memory_mb=None, enable_prefix_caching=False,
                          gpu_memory_utilization=0.5)
    params = {k: {"string_value": v} for k, v in to_parameters(config).items()}
    back = from_parameters(params, "/models/llm")
    assert back.to_dict() == {**config.to_dict(), "model": "/models/llm/ckpt"}


def test_engine_settings_reject_unknown_and_bad_values():
    with pytest.raises(InvalidParameterError, match="max_batch"):
        from_parameters({"max_batch": {"string_value": "3"}})
    with pytest.raises(InvalidParameterError, match="max_num_seqs"):
        from_parameters({"max_num_seqs": {"string_value": "many"}})
    with pytest.raises(InvalidParameterError, match="max_num_seqs"):
        from_parameters({"max_num_seqs": {"string_value": "0"}})


@pytest.fixture(scope="module")
def preprocessor(smollm2_dir):
    from backend.engine.checkpoint import load_tokenizer

    return Preprocessor(load_tokenizer(smollm2_dir))


def test_chat_template_and_messages(preprocessor):
    tok = preprocessor.tokenizer
    raw = preprocessor.encode("What is 2+2?")
    chat = preprocessor.encode("What is 2+2?", apply_chat_template=True)
    assert tok.decode(raw) == "What is 2+2?"
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in tok.decode(chat)
    assert tok.decode(chat).endswith("<|im_start|>assistant\n")
    conversation = '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]'
    assert "<|im_start|>system\nBe brief." in tok.decode(preprocessor.encode(conversation, True))


def test_word_list_format(preprocessor):
    words = preprocessor.word_list(["Paris", ""])
    assert words.shape[0:2] == (1, 2) and words.dtype == np.int32
    ids, ends = words[0]
    sequences, start = [], 0
    for end in ends[ends >= 0]:
        sequences.append(ids[start:end].tolist())
        start = end
    tok = preprocessor.tokenizer
    assert [tok.decode(s) for s in sequences] == ["Paris", " Paris"]
    empty = preprocessor.word_list([])
    assert empty.tolist() == [[[0], [-1]]]


def test_bool_parameter():
    assert parse_bool_parameter({"a": "true"}, "a") is True
    assert parse_bool_parameter({"a": False}, "a") is False
    assert parse_bool_parameter({}, "a") is None
    with pytest.raises(InvalidParameterError, match="a"):
        parse_bool_parameter({"a": "yes please"}, "a")
