"""Requests that carry several prompts (batch dimension above 1), without a server: how preprocessing pads them,
how the engine model splits them into rows, and how the rows share one response sender (batching.py)."""
from __future__ import annotations

import numpy as np
import pytest

from backend.engine.errors import InvalidParameterError
from backend.engine.outputs import RequestOutput
from backend.engine.sampling_params import MAX_SEED, SamplingParams
from backend.serving.batching import (ResponseGroup, RunningRequests, is_stop_request, members, parse_rows,
                                      sequence_params, split_rows)
from backend.serving.preprocess import Preprocessor, preprocess_rows
from backend.serving.request_parser import parse_request
from backend.serving.session import Session
from tests.test_serving_units import FakeEngine, FakeStream, RecordingSink, engine_outputs, tensors

PROMPTS = ["What is the capital of France?", "Hi", "Name three colours of the rainbow, please."]


@pytest.fixture(scope="module")
def preprocessor(smollm2_dir):
    from backend.engine.checkpoint import load_tokenizer

    return Preprocessor(load_tokenizer(smollm2_dir))


def text_tensor(prompts: list[str]) -> np.ndarray:
    return np.array([[p.encode()] for p in prompts], dtype=np.object_)


def test_rows_of_a_preprocessed_batch_are_each_prompt_alone(preprocessor):
    """Padded to the longest prompt on the way in, each row's ids and bad words come back exactly as a
    request of that prompt alone would carry them."""
    words = np.array([[b"Paris", b""], [b"", b""], [b"red", b"blue"]], dtype=np.object_)
    outputs = preprocess_rows(preprocessor, text_tensor(PROMPTS), words, apply_chat_template=True)
    lengths = [len(preprocessor.encode(p, True)) for p in PROMPTS]
    assert outputs["input_ids"].shape == (3, max(lengths)) and outputs["input_lengths"].tolist() == [[n] for n in lengths]
    assert outputs["bad_words_ids"].shape[:2] == (3, 2)
    inputs = {**outputs, "max_tokens": np.array([[4], [5], [6]], dtype=np.int32)}
    rows = split_rows(inputs)
    assert len(rows) == 3 and all("input_lengths" not in row for row in rows)
    for prompt, row_words, row, max_tokens in zip(PROMPTS, words, rows, (4, 5, 6)):
        alone = preprocess_rows(preprocessor, text_tensor([prompt]), row_words[None], apply_chat_template=True)
        parsed, expected = parse_request(row), parse_request({**split_rows(alone)[0], "max_tokens": row["max_tokens"]})
        assert parsed.prompt_ids == preprocessor.encode(prompt, True) == expected.prompt_ids
        assert parsed.params.bad_token_sequences == expected.params.bad_token_sequences
        assert parsed.params.max_tokens == max_tokens


def test_one_prompt_keeps_the_single_request_layout(preprocessor):
    outputs = preprocess_rows(preprocessor, text_tensor(["Hello"]), None)
    assert outputs["input_ids"].tolist() == [preprocessor.encode("Hello")]
    assert outputs["bad_words_ids"].tolist() == preprocessor.word_list([]).tolist()
    (row,) = split_rows({**outputs, "max_tokens": np.array([[3]], dtype=np.int32)})
    assert row["input_ids"].tolist() == [preprocessor.encode("Hello")]


def test_an_empty_prompt_in_a_batch_names_text_input_and_its_row(preprocessor):
    with pytest.raises(InvalidParameterError, match=r"text_input: row 1: must not be empty"):
        preprocess_rows(preprocessor, text_tensor(["Hello", ""]), None)
    with pytest.raises(InvalidParameterError, match="bad_words: expected one row per prompt"):
        preprocess_rows(preprocessor, text_tensor(["Hello", "Hi"]), np.array([[b"x"]], dtype=np.object_))


def test_inputs_must_have_one_row_per_prompt():
    inputs = tensors(input_ids=np.array([[1, 2], [3, 4]], dtype=np.int32))  # max_tokens has one row only
    with pytest.raises(InvalidParameterError, match="max_tokens: has batch size 1, but input_ids has 2"):
        split_rows(inputs)
    with pytest.raises(InvalidParameterError, match=r"input_lengths: must be in \[1, 2\]"):
        split_rows(tensors(input_ids=np.array([[1, 2]], dtype=np.int32), input_lengths=np.array([[3]], dtype=np.int32)))


def run_rows(row_tokens: list[list[int]], stream: bool, fail_row: int | None = None):
    """Sessions of one request's rows, run one after another (row order reversed, so the first row finishes
    last), all sending through one ResponseGroup into one recording sink."""
    sink, engine, aborted = RecordingSink(), FakeEngine(), []
    plan = members([1] * len(row_tokens))
    group = ResponseGroup(sink, len(plan), lambda: aborted.append("all"))
    for member in reversed(plan):
        request = parse_request(tensors(stream=stream, exclude_input_in_output=True))
        outputs = engine_outputs(row_tokens[member.row])
        if member.row == fail_row:
            outputs = [RequestOutput("r", [], None, True, "error", error="engine step failed: boom")]
        Session(engine, f"r.{member.row}", request, FakeStream(outputs), group.member(member.tags), block_size=16).run()
    return sink, aborted


def texts_by_row(sink: RecordingSink) -> dict[int, str]:
    texts: dict[int, str] = {}
    for outputs, _ in sink.sent:
        index = int(outputs["batch_index"][0, 0])
        texts[index] = texts.get(index, "") + outputs["text_output"][0, 0].decode()
    return texts


@pytest.mark.parametrize("stream", [True, False])
def test_rows_share_one_sender_and_only_the_last_to_finish_is_final(stream):
    sink, aborted = run_rows([[1, 2, 0], [4, 5, 6, 7, 0]], stream)
    assert texts_by_row(sink) == {0: "Hello world", 1: " how are you?"}
    assert [final for _, final in sink.sent] == [False] * (len(sink.sent) - 1) + [True]
    assert int(sink.sent[-1][0]["batch_index"][0, 0]) == 0  # row 0 ran last
    assert not sink.errors and not aborted
    if not stream:
        assert len(sink.sent) == 2  # one response per prompt


def test_one_row_failing_fails_the_request_once_and_aborts_the_others():
    sink, aborted = run_rows([[1, 2, 0], [4, 5, 0], [6, 7, 0]], stream=True, fail_row=1)
    assert sink.errors == ["generation failed: engine step failed: boom"] and aborted == ["all"]
    assert texts_by_row(sink) == {2: " you?"}  # row 2 finished before the failure; row 0's outputs are dropped
    assert not any(final for _, final in sink.sent)  # the error was the final response


def test_a_single_prompt_request_has_no_batch_index():
    sink, _ = run_rows([[1, 2, 0]], stream=False)
    assert len(sink.sent) == 1 and sink.sent[0][1] is True and "batch_index" not in sink.sent[0][0]


def test_a_bad_value_in_one_row_names_the_input_and_the_row():
    rows = split_rows({"input_ids": np.array([[1, 2], [3, 4]], dtype=np.int32),
                       "max_tokens": np.array([[4], [0]], dtype=np.int32)})
    with pytest.raises(InvalidParameterError, match=r"^max_tokens: row 1: must be >= 1, got 0$"):
        parse_rows(rows, parse_request)
    assert [r.params.max_tokens for r in parse_rows(rows[:1], parse_request)] == [4]


def test_members_are_tagged_as_tensorrt_llm_tags_them():
    assert [(m.row, m.sequence, m.tags) for m in members([1])] == [(0, 0, {})]
    assert [m.tags for m in members([1, 1])] == [{"batch_index": 0}, {"batch_index": 1}]
    assert [m.tags for m in members([2])] == [{"sequence_index": 0}, {"sequence_index": 1}]
    assert [m.tags for m in members([2, 1])] == [{"batch_index": 0, "sequence_index": 0},
                                                 {"batch_index": 0, "sequence_index": 1}, {"batch_index": 1}]


def test_each_sequence_of_a_seeded_row_gets_its_own_seed():
    seeded = SamplingParams(max_tokens=4, temperature=1.0, seed=MAX_SEED - 1)
    assert [sequence_params(seeded, i).seed for i in range(3)] == [MAX_SEED - 1, MAX_SEED, 0]
    unseeded = SamplingParams(max_tokens=4, temperature=1.0)
    assert sequence_params(unseeded, 2) is unseeded


@pytest.mark.parametrize("count, ok", [(1, True), (3, True), (64, True), (0, False), (65, False)])
def test_num_return_sequences_is_bounded(count, ok):
    inputs = tensors(num_return_sequences=count)
    if ok:
        assert parse_request(inputs).num_sequences == count
    else:
        with pytest.raises(InvalidParameterError, match=r"num_return_sequences: must be in \[1, 64\]"):
            parse_request(inputs)


def test_running_requests_are_found_by_client_id_until_their_group_closes():
    running = RunningRequests()
    running.add("client-1", ["r.0.0", "r.0.1"])
    running.add("", ["anonymous"])  # no request id: nothing to stop it by
    assert running.engine_ids("client-1") == ["r.0.0", "r.0.1"] and running.engine_ids("") == []
    sink, closed = RecordingSink(), []
    group = ResponseGroup(sink, 2, on_close=lambda: (closed.append(True), running.remove("client-1", ["r.0.0", "r.0.1"])))
    group.send({"sequence_index": 0}, {"text_output": np.array([[b"a"]], dtype=np.object_)}, final=True)
    assert not closed and running.engine_ids("client-1")
    group.send({"sequence_index": 1}, {"text_output": np.array([[b"b"]], dtype=np.object_)}, final=True)
    assert closed == [True] and running.engine_ids("client-1") == []
    assert is_stop_request({"stop": np.array([[True]])}) and not is_stop_request({"stop": np.array([[False]])})
    assert not is_stop_request({"text_input": np.array([[b"x"]], dtype=np.object_)})
