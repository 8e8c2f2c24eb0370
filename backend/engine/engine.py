"""The offline engine: add requests, step, abort. step() is schedule -> run -> postprocess.

Async scheduling (config.async_scheduling; the idea of SGLang's overlap scheduler and vLLM's async
scheduling, written anew here): a decode step at batch 256 is ~10 ms of GPU work and was ~5 ms of host work
after it (update, schedule, prepare), done while the GPU idled. With the switch on, step() schedules and
launches step N+1 first, then waits for step N's tokens and takes them in, so the host work runs under the
GPU's. Decode rows of step N+1 carry a placeholder for step N's token, filled in on the device. Stops are seen
one step late; the extra token is dropped (scheduler.update_from_output). Requests whose sampling reads the
token history (penalties, bad words) run synchronously: while one is live, step() is the reference path.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

from .block_manager import BlockManager
from .checkpoint import load_tokenizer, resolve_checkpoint
from .config import EngineConfig
from .errors import InvalidParameterError
from .model_config import ModelConfig
from .parallel.runner import make_runner
from .outputs import RequestOutput, SchedulerOutput
from .sampler import PendingTokens
from .request import Request
from .sampling_params import MAX_SEED, SamplingParams
from .scheduler import Scheduler

log = logging.getLogger(__name__)


def resolve_max_model_len(model_config: ModelConfig, config: EngineConfig) -> int:
    """The context length served: the model's (capped by a sliding window if any), or less if configured."""
    limit = model_config.max_model_len
    return min(config.max_model_len, limit) if config.max_model_len else limit


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.checkpoint_dir: Path = resolve_checkpoint(config.model or None)
        self.runner = make_runner(config, self.checkpoint_dir)  # tensor_parallel_size > 1: rank 0 + workers
        self.model_config = self.runner.model_config
        self.max_model_len = resolve_max_model_len(self.model_config, config)
        self.runner.warm_up(self.max_model_len)
        self.scheduler = Scheduler(
            BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
            max_waiting_requests=config.max_waiting_requests,
        )
        self._seed_source = random.Random(config.seed)
        self._requests: dict[str, Request] = {}
        self._num_sent: dict[str, int] = {}  # output tokens already handed to the caller, per request
        self._in_flight: tuple[SchedulerOutput, PendingTokens] | None = None  # async: launched, not taken in
        self._num_history_requests = 0  # live requests whose sampling needs the token history on the host
        self._tokenizer = None
        self.num_steps = 0
        self._num_generate_calls = 0
        self.max_batch_size_seen = 0

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.checkpoint_dir)
        return self._tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.model_config.eos_token_ids)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        if request_id in self._requests:
            raise InvalidParameterError("request_id", f"{request_id!r} is already running")
        self._check_token_ids(prompt_token_ids)
        if not params.end_ids:  # kept with ignore_eos too: min_tokens still bans them
            params = dataclasses.replace(params, end_ids=self.eos_token_ids)
        seed = params.seed if params.seed is not None else self._seed_source.randint(0, MAX_SEED)
        request = Request(request_id, list(prompt_token_ids), params, seed=seed)
        self.scheduler.add_request(request)
        self._requests[request_id] = request
        self._num_sent[request_id] = 0
        self._num_history_requests += params.needs_token_history
        return request

    def _check_token_ids(self, token_ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        if not token_ids:
            raise InvalidParameterError("prompt", "must contain at least one token")
        bad = next((t for t in token_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise InvalidParameterError("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort_request(request_id)
        if request is None:
            return None
        return self._output_for(request)

    def has_unfinished(self) -> bool:
        # An in-flight step alone does not count: every unfinished request is in the scheduler, so a step
        # left in flight then holds only finished requests, whose tokens the next step drops anyway.
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        if self.config.async_scheduling and not self._num_history_requests:
            return self._step_async()
        return self._take_in_flight() + self._step_sync()

    def _step_sync(self) -> list[RequestOutput]:
        """The reference: schedule, run and wait, take the tokens in."""
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        sampled = self.runner.execute(scheduled)
        self.scheduler.update_from_output(scheduled, sampled)
        self._count_step(scheduled)
        return self._collect_outputs(scheduled)

    def _step_async(self) -> list[RequestOutput]:
        """Launch step N+1, then wait for step N's tokens and take them in while the GPU runs N+1."""
        scheduled = self.scheduler.schedule()
        pending = None if scheduled.is_empty else self.runner.launch(scheduled)
        outputs = self._take_in_flight()
        if pending is not None:
            self._in_flight = (scheduled, pending)
            self._count_step(scheduled)
        return outputs

    def _take_in_flight(self) -> list[RequestOutput]:
        if self._in_flight is None:
            return []
        scheduled, pending = self._in_flight
        self._in_flight = None
        self.scheduler.update_from_output(scheduled, pending.result())
        return self._collect_outputs(scheduled)

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Abort every live request with an error: what an exception inside a step leaves behind."""
        self._in_flight = None
        return [dataclasses.replace(output, finish_reason="error", error=error) for output in self.abort_all()]

    def abort_all(self) -> list[RequestOutput]:
        """Abort every live request (shutdown): their final 'abort' outputs."""
        outputs = [self.abort_request(request_id) for request_id in list(self._requests)]
        return [output for output in outputs if output is not None]

    def _count_step(self, scheduled: SchedulerOutput) -> None:
        self.num_steps += 1
        self.max_batch_size_seen = max(self.max_batch_size_seen, len(scheduled.chunks))

    def _collect_outputs(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        outputs = []
        for chunk in scheduled.chunks:
            request = chunk.request
            if self._requests.get(request.request_id) is not request:
                continue  # already reported finished (aborted, or stopped a step earlier under async scheduling)
            if request.is_finished or request.num_output_tokens > self._num_sent[request.request_id]:
                outputs.append(self._output_for(request))
        return outputs

    def _output_for(self, request: Request) -> RequestOutput:
        start = self._num_sent[request.request_id]
        self._num_sent[request.request_id] = request.num_output_tokens
        finished = request.is_finished
        if finished:
            del self._requests[request.request_id]
            del self._num_sent[request.request_id]
            self._num_history_requests -= request.sampling_params.needs_token_history
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=request.output_token_ids[start:],
            new_logprobs=request.output_logprobs[start:] if request.sampling_params.logprobs else None,
            finished=finished,
            finish_reason=request.status.value if finished else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_new_blocks=request.num_new_blocks,
        )

    def shutdown(self) -> None:
        """Stops what the engine started (tensor-parallel worker processes); steps fail afterwards."""
        self._in_flight = None
        self.runner.shutdown()

    def stats(self) -> dict:
        return {**self.scheduler.stats(), "steps": self.num_steps, "max_batch_size_seen": self.max_batch_size_seen}

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together; returns the generated token ids of each, in order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        self._num_generate_calls += 1
        ids = [f"generate-{self._num_generate_calls}-{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {request_id: [] for request_id in ids}
        for request_id, prompt, p in zip(ids, prompts, all_params):
            self.add_request(request_id, prompt, p)
        while self.has_unfinished():
            for output in self.step():
                results[output.request_id] += output.new_token_ids
        return [results[request_id] for request_id in ids]
