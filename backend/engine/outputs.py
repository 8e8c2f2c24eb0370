"""The small dataclasses that stages hand each other: scheduler -> runner -> engine -> caller."""
from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request


@dataclass
class ScheduledChunk:
    """One request's share of a step: compute tokens [start, start + num_tokens) of its sequence.

    `start` and `seq_len` are taken when the chunk is made, so they describe the step as scheduled however
    the request moves on afterwards, and reading them costs no property chain (the runner and the scheduler
    read them for every row of every step).
    """

    request: Request
    num_tokens: int
    block_ids: list[int]
    start: int = -1  # -1: the request's num_computed_tokens now
    seq_len: int = -1  # tokens in the sequence when scheduled; -1: the request's num_tokens now

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.request.num_computed_tokens
        if self.seq_len < 0:
            self.seq_len = self.request.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """A chunk that reaches the last token of the sequence produces the next token."""
        return self.start + self.num_tokens == self.seq_len

    @property
    def output_index(self) -> int:
        """Which output token this chunk samples (when it samples): the seeded draw's position."""
        return self.seq_len - len(self.request.prompt_token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class SampledTokens:
    """What the runner produced for the chunks that sample, in chunk order."""

    token_ids: list[int]
    logprobs: list[float] | None = None


@dataclass
class RequestOutput:
    """What a caller receives per step for one request: the new tokens since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_new_blocks: int = 0
    error: str | None = None
    error_code: str | None = None  # set when the engine refused the request: its Triton code (errors.error_code_name)
