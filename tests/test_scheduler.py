"""Scheduler: in-flight batching, budgets, chunked prefill, preemption, abort, prefix reuse and stop conditions.

Pure Python: requests and the runner's sampled tokens are built here, no model runs.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.engine.block_manager import BlockManager
from backend.engine.errors import EngineOverloadedError, InvalidParameterError
from backend.engine.outputs import SampledTokens
from backend.engine.request import Request, RequestStatus
from backend.engine.sampling_params import SamplingParams
from backend.engine.scheduler import Scheduler


def make_request(request_id, num_prompt, start=0, **params):
    return Request(request_id, list(range(start, start + num_prompt)), SamplingParams(**params))


def make_scheduler(num_blocks=64, block_size=4, prefix_caching=False, max_num_seqs=8, budget=64,
                   max_model_len=256, chunked=True, max_waiting=4096):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(bm, max_num_seqs, budget, max_model_len, enable_chunked_prefill=chunked,
                     max_waiting_requests=max_waiting)


def step(sched, tokens=None):
    """One engine step with a fake runner: every sampling chunk gets the next of `tokens` (default 7)."""
    out = sched.schedule()
    n = sum(chunk.samples for chunk in out.chunks)
    token_ids = list(tokens) if tokens is not None else [7] * n
    assert len(token_ids) == n
    return out, sched.update_from_output(out, SampledTokens(token_ids))


def shape(out):
    return [(chunk.request.request_id, chunk.num_tokens) for chunk in out.chunks]


def all_free(sched):
    bm = sched.block_manager
    return bm.num_free_blocks == bm.num_total_blocks and bm.num_used_blocks == 0


# ---- batching ----
def test_new_request_joins_running_batch():
    sched = make_scheduler()
    a = make_request("a", 10, max_tokens=5)
    sched.add_request(a)
    out, _ = step(sched)
    assert shape(out) == [("a", 10)]
    assert a.status is RequestStatus.RUNNING and a.num_computed_tokens == 10 and a.output_token_ids == [7]
    sched.add_request(make_request("b", 6, max_tokens=5))
    out, _ = step(sched)
    assert shape(out) == [("a", 1), ("b", 6)]  # a decodes while b prefills, in one step
    out = sched.schedule()
    assert shape(out) == [("a", 1), ("b", 1)]
    for chunk in out.chunks:  # before update_from_output moves num_computed_tokens
        assert len(chunk.block_ids) * 4 >= chunk.end


def test_token_budget_splits_and_defers():
    sched = make_scheduler(budget=16)
    for rid in "abc":
        sched.add_request(make_request(rid, 10, max_tokens=4))
    out = sched.schedule()
    assert shape(out) == [("a", 10), ("b", 6)]  # c gets no budget this step
    assert out.num_batched_tokens == 16
    assert sched.num_running == 2 and sched.num_waiting == 1
    sched.update_from_output(out, SampledTokens([7]))  # only a sampled
    out = sched.schedule()
    assert shape(out) == [("a", 1), ("b", 4), ("c", 10)]


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(make_request(rid, 3, max_tokens=2))
    out, _ = step(sched)
    assert shape(out) == [("a", 3), ("b", 3)]
    assert sched.num_running == 2 and sched.num_waiting == 1
    out, finished = step(sched)
    assert shape(out) == [("a", 1), ("b", 1)] and [r.request_id for r in finished] == ["a", "b"]
    out, _ = step(sched)
    assert shape(out) == [("c", 3)]


def test_chunked_prefill_splits_and_samples_only_on_last_chunk():
    sched = make_scheduler(block_size=16, budget=32)
    req = make_request("a", 100, max_tokens=3)
    sched.add_request(req)
    sizes, samples, computed = [], [], []
    for _ in range(4):
        out, _ = step(sched)
        sizes.append(out.chunks[0].num_tokens)
        computed.append(req.num_computed_tokens)
        samples.append(len(req.output_token_ids))
    assert sizes == [32, 32, 32, 4]
    assert computed == [32, 64, 96, 100]
    assert samples == [0, 0, 0, 1]


def test_chunk_block_ids_cover_whole_sequence():
    sched = make_scheduler(block_size=16, budget=32)
    sched.add_request(make_request("a", 100))
    out = sched.schedule()
    sched.update_from_output(out, SampledTokens([]))
    out = sched.schedule()
    assert out.chunks[0].start == 32 and out.chunks[0].end == 64
    assert len(out.chunks[0].block_ids) == 4  # positions 0..63


def test_without_chunked_prefill_prompt_waits_for_room():
    sched = make_scheduler(budget=32, chunked=False, max_model_len=32)
    sched.add_request(make_request("a", 20, max_tokens=4))
    sched.add_request(make_request("b", 20, max_tokens=4))
    out, _ = step(sched)
    assert shape(out) == [("a", 20)]
    out, _ = step(sched)
    assert shape(out) == [("a", 1), ("b", 20)]


def test_partial_prefill_consumes_no_sampled_token():
    sched = make_scheduler(budget=8)
    sched.add_request(make_request("a", 3, max_tokens=4))
    sched.add_request(make_request("b", 20, max_tokens=4))
    out = sched.schedule()
    assert shape(out) == [("a", 3), ("b", 5)]
    assert [c.samples for c in out.chunks] == [True, False]
    with pytest.raises(ValueError, match="sample"):
        sched.update_from_output(out, SampledTokens([1, 2]))
    sched.update_from_output(out, SampledTokens([11]))
    assert out.chunks[0].request.output_token_ids == [11]
    assert out.chunks[1].request.output_token_ids == []


def test_sampled_tokens_skip_non_sampling_chunks_in_any_position():
    sched = make_scheduler()
    a, b = make_request("a", 10), make_request("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    out.chunks[0].num_tokens = 4  # make a's chunk a partial prefill ahead of b's sampling chunk
    sched.update_from_output(out, SampledTokens([9]))
    assert a.output_token_ids == [] and a.num_computed_tokens == 4
    assert b.output_token_ids == [9]


# ---- preemption ----
def test_preempts_latest_arrival_and_recomputes():
    # 6 blocks of 4: three 8-token prompts fill the pool exactly.
    sched = make_scheduler(num_blocks=6, block_size=4, max_model_len=64)
    a, b, c = (make_request(rid, 8, start=10 * i, max_tokens=3) for i, rid in enumerate("abc"))
    for req in (a, b, c):
        sched.add_request(req)
    step(sched, [1, 2, 3])
    d = make_request("d", 4, max_tokens=1)
    sched.add_request(d)
    out, _ = step(sched, [4, 5])
    assert out.preempted == [c]
    assert shape(out) == [("a", 1), ("b", 1)]  # no admissions in a step that preempted
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert c.output_token_ids == [3]  # outputs kept
    assert list(sched.waiting) == [c, d]  # front of the queue
    assert not sched.block_manager.has_blocks("c")
    assert sched.stats()["num_preemptions"] == 1

    out, finished = step(sched, [6, 7])  # a and b reach max_tokens
    assert {r.request_id for r in finished} == {"a", "b"}
    out, _ = step(sched, [8, 9])
    assert shape(out) == [("c", 9), ("d", 4)]  # recompute prompt + the kept output
    assert c.output_token_ids == [3, 8]
    assert sched.running == [c]
    step(sched, [0])
    assert not sched.has_unfinished() and all_free(sched)


def test_request_may_preempt_itself_when_it_is_the_latest():
    sched = make_scheduler(num_blocks=5, block_size=4, max_model_len=64)
    a, b = make_request("a", 8, max_tokens=5), make_request("b", 8, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, [1, 2])
    out, _ = step(sched, [3])  # a takes the last free block; b cannot grow and is the latest arrival
    assert shape(out) == [("a", 1)]
    assert out.preempted == [b] and b.status is RequestStatus.PREEMPTED
    assert sched.running == [a] and list(sched.waiting) == [b]


# ---- abort ----
def test_abort_frees_blocks_from_running_and_waiting():
    sched = make_scheduler(num_blocks=8, prefix_caching=True, max_num_seqs=1)
    a, b = make_request("a", 10), make_request("b", 10)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.block_manager.num_used_blocks == 3
    assert sched.abort_request("b") is b and b.status is RequestStatus.FINISHED_ABORTED
    assert sched.abort_request("a") is a and a.status is RequestStatus.FINISHED_ABORTED
    assert sched.abort_request("a") is None and sched.abort_request("zzz") is None
    assert not sched.has_unfinished() and all_free(sched)
    assert sched.schedule().is_empty


def test_abort_between_schedule_and_update():
    sched = make_scheduler()
    a, b = make_request("a", 5), make_request("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.abort_request("a")
    finished = sched.update_from_output(out, SampledTokens([1, 2]))
    assert finished == [] and a.output_token_ids == [] and b.output_token_ids == [2]
    sched.abort_request("b")
    assert all_free(sched)


# ---- prefix caching ----
def test_prefix_cache_reuses_shared_prefix():
    sched = make_scheduler(block_size=4, prefix_caching=True)
    shared = list(range(100, 116))  # 4 full blocks
    a = Request("a", shared + [1, 2, 3], SamplingParams(max_tokens=2))
    sched.add_request(a)
    step(sched)  # a's prompt blocks are now cached while a still runs
    b = Request("b", shared + [4, 5, 6], SamplingParams(max_tokens=2))
    sched.add_request(b)
    out, _ = step(sched)
    assert shape(out) == [("a", 1), ("b", 3)]
    assert b.num_cached_tokens == 16 and a.num_cached_tokens == 0
    assert out.chunks[1].block_ids[:4] == out.chunks[0].block_ids[:4]
    assert b.num_new_blocks < a.num_new_blocks
    stats = sched.stats()
    assert stats["prefix_cache_hit_tokens"] == 16
    assert stats["prefix_cache_query_tokens"] == 19 + 19
    while sched.has_unfinished():
        step(sched)
    assert all_free(sched)


def test_prefix_cache_never_caches_every_token():
    sched = make_scheduler(block_size=4, prefix_caching=True)
    sched.add_request(make_request("a", 16, max_tokens=1))
    step(sched)
    b = make_request("b", 16, max_tokens=1)  # identical, block-aligned prompt
    sched.add_request(b)
    out, finished = step(sched)
    assert b.num_cached_tokens == 12
    assert shape(out) == [("b", 4)] and finished == [b]


def test_prefix_cache_off_computes_everything():
    sched = make_scheduler(block_size=4, prefix_caching=False)
    sched.add_request(make_request("a", 16, max_tokens=1))
    step(sched)
    b = make_request("b", 16, max_tokens=1)
    sched.add_request(b)
    out, _ = step(sched)
    assert shape(out) == [("b", 16)] and b.num_cached_tokens == 0


def test_preempted_request_reuses_its_own_cached_blocks():
    sched = make_scheduler(num_blocks=5, block_size=4, prefix_caching=True, max_model_len=64)
    a, b = make_request("a", 8, max_tokens=2), make_request("b", 8, start=50, max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, [1, 2])
    out, finished = step(sched, [3])  # b preempted, its 2 full prompt blocks stay cached; a finishes
    assert out.preempted == [b] and finished == [a]
    assert sched.block_manager.num_cached_blocks >= 2
    out, _ = step(sched, [4])
    assert shape(out) == [("b", 1)]  # only the last known token is recomputed
    assert b.num_computed_tokens == 9 and b.output_token_ids == [2, 4]
    assert b.num_cached_tokens == 0  # only counted at the first schedule
    assert b.num_new_blocks == 3  # 2 at first + 1 after the restart


# ---- stop conditions ----
@pytest.mark.parametrize(
    "params, tokens, expected_outputs, status",
    [
        (dict(end_ids=[2], max_tokens=10), [5, 2, 9], [5, 2], RequestStatus.FINISHED_STOPPED),
        (dict(max_tokens=3), [5, 6, 7, 8], [5, 6, 7], RequestStatus.FINISHED_LENGTH),
        (dict(stop_token_sequences=[[8, 9]], max_tokens=10), [8, 1, 8, 9, 4], [8, 1, 8, 9], RequestStatus.FINISHED_STOPPED),
        (dict(end_ids=[2], min_tokens=3, max_tokens=10), [2, 2, 2, 2], [2, 2, 2], RequestStatus.FINISHED_STOPPED),
        (dict(end_ids=[2], ignore_eos=True, max_tokens=3), [2, 2, 2, 2], [2, 2, 2], RequestStatus.FINISHED_LENGTH),
    ],
)
def test_stop_conditions(params, tokens, expected_outputs, status):
    sched = make_scheduler()
    req = make_request("a", 5, **params)
    sched.add_request(req)
    finished = []
    for token in tokens:
        _, finished = step(sched, [token])
        if finished:
            break
    assert finished == [req]
    assert req.output_token_ids == expected_outputs and req.status is status
    assert not sched.has_unfinished() and all_free(sched)


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=12)
    req = make_request("a", 10, max_tokens=100)
    sched.add_request(req)
    step(sched)
    _, finished = step(sched)
    assert finished == [req] and req.status is RequestStatus.FINISHED_LENGTH and req.num_tokens == 12


def test_cache_capacity_finishes_lone_request_with_length():
    sched = make_scheduler(num_blocks=3, block_size=4, max_model_len=100)  # room for 12 tokens
    req = make_request("a", 8, max_tokens=100)
    sched.add_request(req)
    while sched.has_unfinished():
        step(sched)
    assert req.status is RequestStatus.FINISHED_LENGTH and req.num_tokens == 13
    assert sched.stats()["num_preemptions"] == 0 and all_free(sched)


def test_logprobs_are_appended():
    sched = make_scheduler()
    req = make_request("a", 3, max_tokens=2, logprobs=True)
    sched.add_request(req)
    out = sched.schedule()
    sched.update_from_output(out, SampledTokens([4], logprobs=[-0.5]))
    assert req.output_logprobs == [-0.5]


# ---- validation ----
def field_of(excinfo):
    return excinfo.value.field


def test_validation_errors_name_the_field():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=32, budget=64)
    with pytest.raises(InvalidParameterError) as e:
        sched.add_request(Request("a", [], SamplingParams()))
    assert field_of(e) == "prompt"
    with pytest.raises(InvalidParameterError, match="max_model_len 32") as e:
        sched.add_request(make_request("a", 32))
    assert field_of(e) == "prompt" and "longer than the context" in str(e.value)
    with pytest.raises(InvalidParameterError, match="KV cache") as e:
        sched.add_request(make_request("a", 16))  # 17 tokens need 5 blocks of 4; there are 4
    assert field_of(e) == "prompt"
    sched.add_request(make_request("a", 15))
    with pytest.raises(InvalidParameterError) as e:
        sched.add_request(make_request("a", 3))
    assert field_of(e) == "request_id"


def test_prompt_over_budget_without_chunked_prefill():
    sched = make_scheduler(budget=8, chunked=False)
    with pytest.raises(InvalidParameterError, match="max_num_batched_tokens") as e:
        sched.add_request(make_request("a", 9))
    assert e.value.field == "prompt"
    sched.add_request(make_request("b", 8))
    chunked = make_scheduler(budget=8, chunked=True)
    chunked.add_request(make_request("a", 9))


def test_waiting_queue_bound():
    sched = make_scheduler(max_waiting=2)
    sched.add_request(make_request("a", 3))
    sched.add_request(make_request("b", 3))
    with pytest.raises(EngineOverloadedError):
        sched.add_request(make_request("c", 3))
    step(sched)
    sched.add_request(make_request("c", 3))  # the queue drained into the running batch


@pytest.mark.parametrize("name", ["max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_waiting_requests"])
def test_constructor_rejects_bad_limits(name):
    kwargs = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32, max_waiting_requests=8)
    kwargs[name] = 0
    with pytest.raises(InvalidParameterError) as e:
        Scheduler(BlockManager(8, 4, False), **kwargs)
    assert e.value.field == name


def test_stats_keys():
    sched = make_scheduler(num_blocks=16)
    sched.add_request(make_request("a", 5))
    stats = sched.stats()
    for key in ("num_running", "num_waiting", "kv_blocks_total", "kv_blocks_used", "kv_blocks_free",
                "num_preemptions", "prefix_cache_hit_tokens", "prefix_cache_query_tokens"):
        assert key in stats
    assert stats["num_waiting"] == 1 and stats["kv_blocks_total"] == 16 and stats["kv_blocks_free"] == 16


# ---- property test ----
request_spec = st.tuples(
    st.integers(0, 6),  # arrival step
    st.integers(0, 2),  # which shared prefix
    st.integers(1, 24),  # prompt length
    st.integers(1, 8),  # max_tokens
    st.one_of(st.none(), st.integers(0, 10)),  # abort at this step (None: never)
)


def check_step(sched, out):
    bm = sched.block_manager
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.chunks) <= sched.max_num_seqs and sched.num_running <= sched.max_num_seqs
    assert len({chunk.request.request_id for chunk in out.chunks}) == len(out.chunks)
    for chunk in out.chunks:
        assert chunk.num_tokens >= 1 and chunk.end <= chunk.request.num_tokens
        assert len(chunk.block_ids) * bm.block_size >= chunk.end
    contents = {}  # block id -> (index in table, tokens): a shared block must hold the same prefix
    for req in sched.running:
        for index, block_id in enumerate(bm.block_table(req.request_id)):
            bs = bm.block_size
            known = req.token_slice(index * bs, min((index + 1) * bs, req.num_tokens))
            assert contents.setdefault(block_id, (index, known)) == (index, known)
    assert bm.num_used_blocks == len(contents) <= bm.num_total_blocks
    assert not any(bm.has_blocks(req.request_id) for req in sched.waiting)


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(request_spec, min_size=1, max_size=12),
    num_blocks=st.integers(4, 24),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(4, 40),
    max_num_seqs=st.integers(1, 5),
    chunked=st.booleans(),
    prefix_caching=st.booleans(),
)
def test_random_traffic_never_leaks_or_exceeds_budgets(specs, num_blocks, block_size, budget, max_num_seqs,
                                                       chunked, prefix_caching):
    sched = make_scheduler(num_blocks, block_size, prefix_caching, max_num_seqs, budget, 48, chunked)
    prefixes = [[1] * 24, list(range(24)), [5, 6] * 12]
    accepted = []
    for step_index in range(400):
        for i, (arrival, prefix, length, max_tokens, _) in enumerate(specs):
            if arrival == step_index:
                try:
                    sched.add_request(Request(f"r{i}", prefixes[prefix][:length], SamplingParams(max_tokens=max_tokens)))
                    accepted.append(i)
                except InvalidParameterError:
                    assert length + 1 > num_blocks * block_size or (not chunked and length > budget)
        for i in accepted:
            if specs[i][4] == step_index:
                sched.abort_request(f"r{i}")
        out = sched.schedule()
        check_step(sched, out)
        n = sum(chunk.samples for chunk in out.chunks)
        finished = sched.update_from_output(out, SampledTokens([step_index % 3] * n))
        assert all(req.is_finished for req in finished)
        if step_index > 10 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished(), "requests never finished (livelock)"
    assert all_free(sched)
