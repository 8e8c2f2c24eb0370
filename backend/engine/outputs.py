"""The small dataclasses that stages hand each other: scheduler -> runner -> engine -> caller."""
from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request


@dataclass
class ScheduledChunk:
    """One request's share of a step: compute tokens [start, start + num_tokens) of its sequence."""

    request: Request
    num_tokens: int
    block_ids: list[int]

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def end(self) -> int:
        return self.request.num_computed_tokens + self.num_tokens

    @property
    def samples(self) -> bool:
        """A chunk that reaches the last known token produces the next token."""
        return self.end == self.request.num_tokens


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
