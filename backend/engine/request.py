"""A request's state as the scheduler and the engine see it. Pure Python: no torch here.

The one scheduling rule (DESIGN.md): a request knows `num_tokens` (prompt + generated) and has
`num_computed_tokens` of them in the KV cache; each step gives it new tokens to compute, up to a budget.
Prefill, chunked prefill, decode, prefix reuse and recompute after preemption are all that one rule.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})


# eq=False: requests compare (and hash) by identity. The generated __eq__ built and compared tuples of all
# fields, and list.remove() on the running list called it once per earlier request: ~1 us each, ~0.25 ms
# per finished request at batch 256.
@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int = 0  # effective seed: the user's, or one the engine drew at arrival
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0  # in the KV cache, by steps whose results the scheduler has taken in
    # Async scheduling (scheduler.py): a step is scheduled while the previous one still runs, so a request
    # can have tokens scheduled but not yet counted as computed, and an output sampled but not yet on the
    # host. Both are 0 whenever no step is in flight.
    num_inflight_tokens: int = 0
    num_output_placeholders: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    num_new_blocks: int = 0  # blocks allocated fresh (not reused from the prefix cache)
    num_preemptions: int = 0
    first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, index: int) -> int:
        n_prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n_prompt else self.output_token_ids[index - n_prompt]

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + outputs, by list slicing (no per-token calls)."""
        n_prompt = len(self.prompt_token_ids)
        if stop <= n_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:stop - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - n_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output(self, token_id: int, logprob: float | None = None) -> None:
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def check_stop(self) -> RequestStatus | None:
        """Finish status after the last appended token, or None to keep going."""
        params = self.sampling_params
        n_out = len(self.output_token_ids)
        if n_out == 0:
            return None
        if n_out >= params.min_tokens:
            last = self.output_token_ids[-1]
            if not params.ignore_eos and last in params.end_ids:
                return RequestStatus.FINISHED_STOPPED
            for sequence in params.stop_token_sequences:
                if len(sequence) <= n_out and self.output_token_ids[-len(sequence):] == sequence:
                    return RequestStatus.FINISHED_STOPPED
        if n_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
