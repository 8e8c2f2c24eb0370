"""Requests that carry several prompts (a batch dimension above 1) or ask for several sequences per prompt
(`num_return_sequences`), as the TensorRT-LLM backend serves them.

With `max_batch_size` > 0 a client may stack B prompts in one request (NVIDIA's end_to_end_grpc_client.py
`--batch-inputs`, perf_analyzer `-b B`): every input then has B rows. As in the TensorRT-LLM backend, each row,
and each of its sequences, becomes its own engine request (a member of the request); each response carries one
member's outputs (batch dimension 1) tagged `batch_index` (sent only when B > 1) and `sequence_index` (only when
that row asked for several sequences), and the request's final flag rides on the response of the last member to
finish, so a non-streamed request ends after one response per member. Triton-free, so it is unit-tested without
a server.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from backend.engine.errors import InvalidParameterError
from backend.engine.sampling_params import MAX_SEED, SamplingParams

PROMPT_INPUTS = ("input_ids", "text_input")  # what sets the batch size: preprocessing's ids, or the text itself


def split_rows(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One dict of inputs per prompt row, each with batch dimension 1. `input_lengths` (preprocessing pads the ids
    of a batch to its longest prompt) trims each row's `input_ids` and is then dropped."""
    prompt = next((name for name in PROMPT_INPUTS if name in inputs), None)
    size = _batch_size(inputs[prompt]) if prompt else 1
    for name, array in inputs.items():
        if _batch_size(array) != size:
            raise InvalidParameterError(
                name, f"has batch size {_batch_size(array)}, but {prompt} has {size}: every input needs one row per prompt")
    if size == 1:
        return [_trim_ids(dict(inputs))]
    return [_trim_ids({name: np.asarray(array)[row:row + 1] for name, array in inputs.items()})
            for row in range(size)]


def parse_rows(rows: list, parse: Callable) -> list:
    """parse(row) for every row; when there are several, an error names its row: "max_tokens: row 1: ..."."""
    if len(rows) == 1:
        return [parse(rows[0])]
    parsed = []
    for index, row in enumerate(rows):
        try:
            parsed.append(parse(row))
        except InvalidParameterError as exc:
            raise InvalidParameterError(exc.field, f"row {index}: {str(exc)[len(exc.field) + 2:]}") from None
    return parsed


def _batch_size(array) -> int:
    array = np.asarray(array)
    return array.shape[0] if array.ndim else 1


def _trim_ids(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    lengths = row.pop("input_lengths", None)
    if lengths is None or "input_ids" not in row:
        return row
    lengths = np.asarray(lengths)
    ids = np.asarray(row["input_ids"])
    if lengths.size != 1 or lengths.dtype == np.bool_ or not np.issubdtype(lengths.dtype, np.integer):
        raise InvalidParameterError("input_lengths", f"expected one integer per prompt, got {lengths.dtype} "
                                                     f"of shape {list(lengths.shape)}")
    length = int(lengths.reshape(-1)[0])
    if not 1 <= length <= ids.shape[-1]:
        raise InvalidParameterError("input_lengths", f"must be in [1, {ids.shape[-1]}] (the ids' length), got {length}")
    row["input_ids"] = ids[..., :length]
    return row


@dataclass(frozen=True)
class Member:
    """One engine request of a Triton request: its prompt row, its sequence in the row, and the tags (output
    name -> value) its responses carry."""

    row: int
    sequence: int
    tags: dict


def members(sequences_per_row: list[int]) -> list[Member]:
    """Every (row, sequence) of a request, with TensorRT-LLM's tags: batch_index when there are several rows,
    sequence_index when the row asked for several sequences."""
    several_rows = len(sequences_per_row) > 1
    return [Member(row, sequence, {**({"batch_index": row} if several_rows else {}),
                                   **({"sequence_index": sequence} if count > 1 else {})})
            for row, count in enumerate(sequences_per_row) for sequence in range(count)]


def sequence_params(params: SamplingParams, sequence: int) -> SamplingParams:
    """The sampling parameters of a row's sequence: a seeded row gives sequence i the seed + i, so sequence 0
    equals the same request asking for one sequence and the others differ; unseeded, the engine draws each."""
    if sequence == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + sequence) % (MAX_SEED + 1))


class RunningRequests:
    """The engine requests of each running Triton request, by the client's request id: a `stop` request with the
    same id aborts them (the TensorRT-LLM backend's way to cancel; a BLS caller such as vllm_model has no other,
    since tritonserver 2.51 does not pass a cancelled BLS request on)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_client: dict[str, list[str]] = {}

    def add(self, client_id: str, engine_ids: list[str]) -> None:
        if client_id:
            with self._lock:
                self._by_client.setdefault(client_id, []).extend(engine_ids)

    def remove(self, client_id: str, engine_ids: list[str]) -> None:
        with self._lock:
            left = [i for i in self._by_client.get(client_id, []) if i not in engine_ids]
            if left:
                self._by_client[client_id] = left
            else:
                self._by_client.pop(client_id, None)

    def engine_ids(self, client_id: str) -> list[str]:
        with self._lock:
            return list(self._by_client.get(client_id, []))


def is_stop_request(inputs: dict[str, np.ndarray]) -> bool:
    stop = inputs.get("stop")
    return stop is not None and np.asarray(stop).size == 1 and bool(np.asarray(stop).reshape(-1)[0])


class ResponseGroup:
    """Shares one request's response sender between the sessions of its members.

    `sink` is the request's own sink (send / send_error / is_cancelled, see session.Sink); `abort_members` stops
    every member's engine request. An error in any member (or the client cancelling) fails the whole request: its
    error is the final response, the other members are aborted, and nothing is sent after it."""

    def __init__(self, sink, size: int, abort_members: Callable[[], None] = lambda: None,
                 on_close: Callable[[], None] = lambda: None):
        self.sink = sink
        self.size = size
        self.abort_members = abort_members
        self.on_close = on_close  # once, after the final response
        self._unfinished = size
        self._closed = False
        self._lock = threading.Lock()

    def member(self, tags: dict) -> "MemberSink":
        return MemberSink(self, tags)

    def send(self, tags: dict, outputs: dict[str, np.ndarray], final: bool) -> None:
        outputs = {**outputs, **{name: np.array([[value]], dtype=np.int32) for name, value in tags.items()}}
        with self._lock:
            if self._closed:
                return
            self._unfinished -= int(final)
            self._closed = self._unfinished == 0
            self.sink.send(outputs, final=self._closed)
            closed = self._closed
        if closed:
            self.on_close()

    def send_error(self, message: str, code_name: str = "INTERNAL") -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.sink.send_error(message, code_name)
        if self.size > 1:
            self.abort_members()
        self.on_close()


class MemberSink:
    """One member's view of its request's ResponseGroup: what a Session sends to."""

    def __init__(self, group: ResponseGroup, tags: dict):
        self.group = group
        self.tags = tags

    def send(self, outputs: dict[str, np.ndarray], final: bool) -> None:
        self.group.send(self.tags, outputs, final)

    def send_error(self, message: str, code_name: str = "INTERNAL") -> None:
        self.group.send_error(message, code_name)

    def is_cancelled(self) -> bool:
        return self.group.sink.is_cancelled()
