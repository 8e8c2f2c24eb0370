"""Async scheduling (step N+1 scheduled while step N runs) gives exactly the synchronous path's outputs.

Engine tests on tiny CPU checkpoints compare the two settings of EngineConfig.async_scheduling; scheduler
tests drive the placeholder bookkeeping by hand (schedule twice, then take the first step's tokens in).
"""
from __future__ import annotations

import pytest
import torch

from backend.engine.config import EngineConfig
from backend.engine.errors import InvalidParameterError
from backend.engine.model_config import ModelConfig
from backend.engine.model_runner import kv_block_bytes
from backend.engine.outputs import SampledTokens
from backend.engine.request import RequestStatus
from backend.engine.sampling_params import SamplingParams
from tests.test_engine import make_engine, mixed_params, random_prompts
from tests.test_scheduler import all_free, make_request, make_scheduler, shape


def run(engine, prompts, params, gap=1, abort_at=None):
    """Adds request i at step i * gap; aborts request id `abort_at[0]` at step `abort_at[1]`.
    Returns {id: (tokens, logprobs, finish_reason)} as the caller saw them."""
    seen = {str(i): ([], [], None) for i in range(len(prompts))}
    pending, step = list(enumerate(zip(prompts, params))), 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] * gap <= step:
            i, (prompt, p) = pending.pop(0)
            engine.add_request(str(i), prompt, p)
        outputs = engine.step()
        if abort_at is not None and step == abort_at[1]:
            outputs.append(engine.abort_request(abort_at[0]))
        for out in outputs:
            tokens, logprobs, reason = seen[out.request_id]
            assert reason is None, f"output for {out.request_id} after it finished"
            seen[out.request_id] = (tokens + out.new_token_ids, logprobs + (out.new_logprobs or []), out.finish_reason)
        step += 1
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and not engine.has_unfinished()
    return seen


def both(path, prompts, params, **kwargs):
    overrides = kwargs.pop("overrides", {})
    sync = run(make_engine(path, async_scheduling=False, **overrides), prompts, params, **kwargs)
    engine = make_engine(path, async_scheduling=True, **overrides)
    return sync, run(engine, prompts, params, **kwargs), engine


def test_greedy_and_seeded_sampling_with_staggered_arrivals(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = random_prompts(256, [3, 40, 9, 25, 60, 14, 7])
    params = mixed_params(len(prompts))
    params[3] = SamplingParams(max_tokens=11, temperature=0.7, seed=5, logprobs=True, ignore_eos=True)
    sync, async_, engine = both(path, prompts, params, gap=2)
    assert async_ == sync
    assert all(reason == "length" for _, _, reason in sync.values())
    assert len(sync["3"][1]) == 11 and engine.max_batch_size_seen >= 4


def test_preemption_and_chunked_prefill_with_tiny_kv_budget(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    prompts = random_prompts(256, [30, 45, 12, 50, 22])
    params = mixed_params(len(prompts))
    # 12 blocks of 8 tokens cannot hold all five requests at once; 16 tokens a step split the prompts.
    block_bytes = kv_block_bytes(ModelConfig.from_dir(path), 8, torch.float32)
    overrides = dict(block_size=8, kv_cache_memory_mb=12 * block_bytes / 2**20, max_num_batched_tokens=16)
    sync, async_, engine = both(path, prompts, params, gap=1, overrides=overrides)
    assert async_ == sync
    assert engine.stats()["num_preemptions"] > 0


def test_end_ids_and_stop_sequences_stop_at_the_same_token(tiny_checkpoint):
    path = tiny_checkpoint("mistral")
    prompts = random_prompts(256, [5, 21, 13, 34])
    free_run = make_engine(path, async_scheduling=False).generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    params = [
        SamplingParams(max_tokens=20, end_ids=[free_run[0][4]]),  # stops at its first occurrence
        SamplingParams(max_tokens=20, stop_token_sequences=[free_run[1][6:8]]),
        SamplingParams(max_tokens=20, end_ids=[free_run[2][9]], min_tokens=12, temperature=0.8, seed=3),
        SamplingParams(max_tokens=20, ignore_eos=True, end_ids=[free_run[3][2]]),  # runs to max_tokens
    ]
    sync, async_, _ = both(path, prompts, params, gap=1)
    assert async_ == sync
    assert sync["0"][2] == "stop" and len(sync["0"][0]) <= 5
    assert sync["1"][2] == "stop" and len(sync["1"][0]) <= 8
    assert sync["3"][2] == "length" and len(sync["3"][0]) == 20


def test_abort_mid_stream(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = random_prompts(256, [12, 30, 8])
    params = [SamplingParams(max_tokens=16, ignore_eos=True)] * 3
    for step in (0, 2, 5):
        sync, async_, _ = both(path, prompts, params, gap=0, abort_at=("1", step))
        assert async_["0"] == sync["0"] and async_["2"] == sync["2"]
        tokens, _, reason = async_["1"]
        assert reason == "abort" and len(tokens) < 16
        full = make_engine(path, async_scheduling=False).generate([prompts[1]], params[1])[0]
        assert tokens == full[:len(tokens)]  # what arrived is right; under async at most one token fewer
        assert len(sync["1"][0]) - 1 <= len(tokens) <= len(sync["1"][0])


def test_penalties_and_bad_words_fall_back_to_the_synchronous_path(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = random_prompts(256, [6, 19, 11, 25])
    params = mixed_params(len(prompts))
    params[1] = SamplingParams(max_tokens=14, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)
    params[2] = SamplingParams(max_tokens=9, bad_token_sequences=[[prompts[2][-1], 5], [7]], ignore_eos=True)
    sync, async_, engine = both(path, prompts, params, gap=3)
    assert async_ == sync
    engine.add_request("x", prompts[0], params[1])
    engine.step()
    assert engine._in_flight is None  # a history-reading request is live: the step ran synchronously
    while engine.has_unfinished():
        engine.step()
    assert engine._num_history_requests == 0


def test_async_scheduling_setting_is_validated():
    assert EngineConfig().async_scheduling is True
    with pytest.raises(InvalidParameterError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")
    with pytest.raises(InvalidParameterError, match="async_scheduling"):
        EngineConfig.from_dict({"async_scheduling": 1})


# ---- scheduler bookkeeping, by hand ----
def test_decode_is_scheduled_on_a_placeholder_before_the_token_is_known():
    sched = make_scheduler()
    a = make_request("a", 6, max_tokens=5)
    sched.add_request(a)
    first = sched.schedule()
    second = sched.schedule()  # the prefill is in flight: a decodes its not-yet-known first token
    assert shape(second) == [("a", 1)]
    chunk = second.chunks[0]
    assert (chunk.start, chunk.seq_len, chunk.output_index) == (6, 7, 1) and chunk.samples
    assert a.num_output_placeholders == 2 and a.num_inflight_tokens == 7
    sched.update_from_output(first, SampledTokens([11]))
    assert a.output_token_ids == [11] and a.num_computed_tokens == 6 and a.num_output_placeholders == 1
    sched.update_from_output(second, SampledTokens([12]))
    assert a.output_token_ids == [11, 12] and a.num_computed_tokens == 7 and a.num_inflight_tokens == 0


def test_request_is_not_rescheduled_when_its_in_flight_token_ends_it_by_length():
    sched = make_scheduler()
    a = make_request("a", 4, max_tokens=1)
    sched.add_request(a)
    first = sched.schedule()
    assert sched.schedule().is_empty
    finished = sched.update_from_output(first, SampledTokens([3]))
    assert finished == [a] and a.status is RequestStatus.FINISHED_LENGTH and all_free(sched)


def test_stop_seen_late_drops_the_extra_token():
    sched = make_scheduler()
    a = make_request("a", 4, max_tokens=8, end_ids=[9])
    sched.add_request(a)
    first = sched.schedule()
    second = sched.schedule()
    assert sched.update_from_output(first, SampledTokens([9])) == [a]  # stops on the end id
    assert all_free(sched)
    assert sched.update_from_output(second, SampledTokens([5])) == []
    assert a.output_token_ids == [9] and a.status is RequestStatus.FINISHED_STOPPED


def test_preempted_while_in_flight_keeps_its_token_and_recomputes():
    # 4 blocks of 4: a (7 tokens) and b (8) take 2 each; b's decode on its placeholder needs a third.
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_request("a", 7, max_tokens=4), make_request("b", 8, start=20, max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()
    assert shape(first) == [("a", 7), ("b", 8)]
    second = sched.schedule()  # b is the latest arrival, so it preempts itself
    assert second.preempted == [b] and shape(second) == [("a", 1)]
    assert b.num_inflight_tokens == 0 and b.num_output_placeholders == 1
    sched.update_from_output(first, SampledTokens([1, 2]))
    assert b.output_token_ids == [2] and b.num_computed_tokens == 0 and b.status is RequestStatus.PREEMPTED
    sched.update_from_output(second, SampledTokens([3]))
    assert a.output_token_ids == [1, 3]
