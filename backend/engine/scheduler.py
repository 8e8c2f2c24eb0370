"""In-flight (continuous) batching over the paged KV cache. Pure Python: no torch here.

One rule (DESIGN.md): each request has `num_tokens` known and `num_computed_tokens` in the KV cache; each
step hands out new tokens to compute, up to `max_num_batched_tokens` and `max_num_seqs`. Running requests go
first (decodes and continuing chunked prefills, in arrival order), then waiting ones FCFS. Prefill, chunked
prefill, decode, prefix reuse and recompute after preemption all fall out of that rule.

When blocks run out for a running request, the latest arrival is preempted by recompute: its blocks are freed,
its computed count reset, and it goes back to the front of the waiting queue with its outputs kept.

Async scheduling (the idea of SGLang's overlap scheduler and vLLM's async scheduling; engine.py drives it):
schedule() may run again before update_from_output() has taken in the previous step. A request then counts
its in-flight tokens as computed-to-be (`num_inflight_tokens`) and its not-yet-known sampled token as a
placeholder (`num_output_placeholders`) that the next decode chunk computes; the runner fills that token in on
the device. A request whose placeholder is its last token by length is not scheduled again. With one step in
flight at most, stop conditions are seen one step late and update_from_output drops the extra token.
"""
from __future__ import annotations

import bisect
import itertools
from collections import deque

from .block_manager import BlockManager, CachedPrefix
from .errors import EngineOverloadedError, InvalidParameterError
from .outputs import SampledTokens, ScheduledChunk, SchedulerOutput
from .request import Request, RequestStatus


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        max_waiting_requests: int = 4096,
    ):
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
            ("max_waiting_requests", max_waiting_requests),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidParameterError(name, f"must be a positive integer, got {value!r}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_waiting_requests = max_waiting_requests
        # A lone request can hold the whole cache but no more; past that it stops with "length" instead of
        # preempting itself forever.
        self._cache_capacity_tokens = block_manager.num_total_blocks * block_manager.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival, so running[-1] is the preemption victim
        self._requests: dict[str, Request] = {}  # unfinished requests by id
        self._arrival: dict[str, int] = {}
        self._arrival_counter = itertools.count()
        self.num_preemptions = 0

    # ---- requests in and out ----
    def add_request(self, request: Request) -> None:
        self._validate(request)
        if len(self.waiting) >= self.max_waiting_requests:
            raise EngineOverloadedError(
                f"{len(self.waiting)} requests are waiting (max_waiting_requests {self.max_waiting_requests}); retry later"
            )
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._arrival[request.request_id] = next(self._arrival_counter)
        self.waiting.append(request)

    def _validate(self, request: Request) -> None:
        n = request.num_prompt_tokens
        if request.request_id in self._requests:
            raise InvalidParameterError("request_id", f"{request.request_id!r} is already in flight")
        if n == 0:
            raise InvalidParameterError("prompt", "must not be empty")
        if n >= self.max_model_len:
            raise InvalidParameterError(
                "prompt", f"{n} tokens is longer than the context (max_model_len {self.max_model_len}) allows"
            )
        bm = self.block_manager
        if bm.blocks_needed(n + 1) > bm.num_total_blocks:
            raise InvalidParameterError(
                "prompt", f"{n} tokens can never fit in the KV cache ({bm.num_total_blocks} blocks of {bm.block_size})"
            )
        if not self.enable_chunked_prefill and n > self.max_num_batched_tokens:
            raise InvalidParameterError(
                "prompt",
                f"{n} tokens exceeds max_num_batched_tokens ({self.max_num_batched_tokens}) without chunked prefill",
            )

    def abort_request(self, request_id: str) -> Request | None:
        request = self._requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._retire(request, RequestStatus.FINISHED_ABORTED)
        return request

    def _retire(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.block_manager.free(request.request_id)
        del self._requests[request.request_id]
        del self._arrival[request.request_id]

    # ---- scheduling ----
    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self._schedule_running(output, self.max_num_batched_tokens)
        if not output.preempted:  # memory is short: admitting more would only cause more preemption
            self._schedule_waiting(output, budget)
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            start = request.num_computed_tokens + request.num_inflight_tokens
            num_new = min(request.num_tokens + request.num_output_placeholders - start, budget)
            if num_new > 0 and not self._ends_in_flight(request) and self._allocate_or_preempt(request, num_new, output):
                self._add_chunk(output, request, num_new)
                budget -= num_new
        return budget

    def _ends_in_flight(self, request: Request) -> bool:
        """True when the request's in-flight sampled token will finish it by length (max_tokens, context or
        cache size): scheduling it again would only compute a token to drop."""
        if not request.num_output_placeholders:
            return False
        seq_len = request.num_tokens + request.num_output_placeholders
        num_outputs = request.num_output_tokens + request.num_output_placeholders
        return (num_outputs >= request.sampling_params.max_tokens or seq_len >= self.max_model_len
                or seq_len > self._cache_capacity_tokens)

    def _allocate_or_preempt(self, request: Request, num_new: int, output: SchedulerOutput) -> bool:
        """Find blocks for the request's next tokens, preempting the latest arrivals; False if it was preempted."""
        num_tokens = request.num_computed_tokens + request.num_inflight_tokens + num_new
        while not self.block_manager.allocate(request.request_id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, output)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_inflight_tokens = 0  # an in-flight step's work is lost; its sampled token still lands
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)  # victims are taken latest-first, so the queue stays in arrival order
        output.preempted.append(request)

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            num_new = self._admit(self.waiting[0], budget, output)
            if num_new == 0:
                break  # the head cannot start: later ones wait too, to keep FCFS
            self.waiting.popleft()
            budget -= num_new

    def _admit(self, request: Request, budget: int, output: SchedulerOutput) -> int:
        """Start (or restart) a waiting request with up to `budget` tokens; returns the tokens scheduled, or 0."""
        if request.num_output_placeholders:  # preempted while a step was in flight: wait for its token
            return 0
        bm = self.block_manager
        cached = bm.find_cached_prefix(request.all_token_ids)
        num_new = request.num_tokens - cached.num_tokens
        if num_new > budget:
            # Without chunked prefill a prompt waits for a step with room; only a preempted request's recompute
            # (prompt + outputs) can exceed the whole budget, and it must be split or it would never run again.
            if not self.enable_chunked_prefill and num_new <= self.max_num_batched_tokens:
                return 0
            num_new = budget
        held_before = len(cached.block_ids)
        if not bm.allocate(request.request_id, cached.num_tokens + num_new, cached):
            return 0
        self._start(request, cached, len(bm.block_table(request.request_id)) - held_before)
        self._add_chunk(output, request, num_new)
        return num_new

    def _start(self, request: Request, cached: CachedPrefix, num_fresh_blocks: int) -> None:
        if request.status is RequestStatus.WAITING:  # first schedule; a preempted one keeps its original count
            request.num_cached_tokens = min(cached.num_tokens, request.num_prompt_tokens)
        request.num_computed_tokens = cached.num_tokens
        request.num_new_blocks += num_fresh_blocks
        request.status = RequestStatus.RUNNING
        # bisect with a key: O(log n) lookups instead of rebuilding every running request's key per admission.
        arrival = self._arrival
        index = bisect.bisect(self.running, arrival[request.request_id], key=lambda r: arrival[r.request_id])
        self.running.insert(index, request)

    def _add_chunk(self, output: SchedulerOutput, request: Request, num_new: int) -> None:
        block_ids = self.block_manager.block_table(request.request_id)
        start = request.num_computed_tokens + request.num_inflight_tokens
        seq_len = request.num_tokens + request.num_output_placeholders
        output.chunks.append(ScheduledChunk(request, num_new, block_ids, start, seq_len))
        request.num_inflight_tokens += num_new
        if start + num_new == seq_len:  # it samples: one more output is on its way
            request.num_output_placeholders += 1

    # ---- results ----
    def update_from_output(self, output: SchedulerOutput, sampled: SampledTokens) -> list[Request]:
        samples = [chunk.samples for chunk in output.chunks]
        if sum(samples) != len(sampled.token_ids):
            raise ValueError(f"{sum(samples)} chunks sample but the runner returned {len(sampled.token_ids)} tokens")
        token_ids, logprobs = sampled.token_ids, sampled.logprobs
        finished: list[Request] = []
        index = 0  # next sampled token
        for chunk, chunk_samples in zip(output.chunks, samples):
            request = chunk.request
            index += chunk_samples
            if request.status.finished:  # aborted, or stopped while this step was in flight: drop its token
                continue
            if request.status is RequestStatus.RUNNING:  # not preempted since: the step's KV is its own
                self._advance(request, chunk.num_tokens)
            if chunk_samples:
                request.num_output_placeholders -= 1
                logprob = logprobs[index - 1] if logprobs is not None else None
                if self._append_sample(request, token_ids[index - 1], logprob):
                    finished.append(request)
        return finished

    def _advance(self, request: Request, num_tokens: int) -> None:
        before = request.num_computed_tokens
        request.num_computed_tokens = after = before + num_tokens
        request.num_inflight_tokens -= num_tokens
        bm = self.block_manager
        # Hash only when a block fills (1 decode step in block_size): sha256 plus the token list is ~5 us.
        if bm.enable_prefix_caching and after // bm.block_size > before // bm.block_size:
            bm.cache_full_blocks(request.request_id, request.all_token_ids, after)

    def _append_sample(self, request: Request, token_id: int, logprob: float | None) -> bool:
        """Append the request's sampled token; finish it if it should stop. Returns True if it finished."""
        request.append_output(token_id, logprob)
        status = request.check_stop()
        if status is None and (
            request.num_tokens >= self.max_model_len or request.num_tokens > self._cache_capacity_tokens
        ):
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            return False
        # A request preempted while its step was in flight sits in the waiting queue when its token lands.
        (self.running if request.status is RequestStatus.RUNNING else self.waiting).remove(request)
        self._retire(request, status)
        return True

    # ---- state ----
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_blocks_total": bm.num_total_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_cached": bm.num_cached_blocks,
            "num_preemptions": self.num_preemptions,
            "prefix_cache_hit_tokens": bm.prefix_cache_hit_tokens,
            "prefix_cache_hit_blocks": bm.prefix_cache_hit_blocks,
            "prefix_cache_query_tokens": bm.prefix_cache_query_tokens,
        }
