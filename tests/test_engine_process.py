"""The engine in a child process (backend/engine/engine_process.py), on CPU with tiny random checkpoints: the
same tokens as the engine in this process, refusals with their codes, abort, shutdown, and a child that dies."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from backend.engine.config import EngineConfig
from backend.engine.engine_process import EngineProcess
from backend.engine.errors import EngineError
from backend.engine.sampling_params import SamplingParams
from tests.test_engine import mixed_params, random_prompts, solo_outputs

WAIT_S = 60


def start(path, **overrides) -> EngineProcess:
    settings = dict(model=str(path), device="cpu", dtype="float32", kv_cache_memory_mb=16)
    settings.update(overrides)
    return EngineProcess(EngineConfig(**settings))


def collect(stream) -> tuple[list[int], object]:
    tokens, last = [], None
    for output in stream:
        tokens += output.new_token_ids
        last = output
    return tokens, last


def test_concurrent_requests_get_the_tokens_of_the_engine_alone(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = random_prompts(256, [5, 33, 12, 21, 48])
    params = mixed_params(len(prompts))
    expected = solo_outputs(path, prompts, params)
    engine = start(path)
    try:
        results: dict[int, list[int]] = {}

        def client(i: int) -> None:
            results[i] = collect(engine.add_request(f"r{i}", prompts[i], params[i]))[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert [results.get(i) for i in range(len(prompts))] == expected
        deadline = time.monotonic() + 5  # the child pushes its stats when it goes idle
        while engine.stats()["num_running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = engine.stats()
        assert stats["num_running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        assert engine.max_model_len > 0 and engine.vocab_size == vocab and engine.eos_token_ids
    finally:
        engine.shutdown()
    assert engine.process.poll() is not None


def test_refusals_arrive_as_final_outputs_with_their_codes(tiny_checkpoint):
    engine = start(tiny_checkpoint("llama"), max_num_seqs=1, max_waiting_requests=1)
    try:
        _, bad = collect(engine.add_request("bad", [3, 999_999], SamplingParams(max_tokens=4)))
        assert bad.finished and bad.error_code == "INVALID_ARG" and "outside the vocabulary" in bad.error
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        streams = [engine.add_request(f"q{i}", [5, 6, 7], long) for i in range(4)]
        outcomes = [collect(stream)[1] for stream in streams]
        refused = [o for o in outcomes if o.error_code]
        # at most one running and one waiting when each arrives (adds that arrive together enter the same step,
        # so the first may still be waiting when the second comes): the rest find the waiting queue full
        assert len(refused) >= 2
        assert all(o.error_code == "UNAVAILABLE" and "max_waiting_requests" in o.error for o in refused)
        assert [o.finish_reason for o in outcomes if not o.error_code] in (["length"], ["length", "length"])
    finally:
        engine.shutdown()


def test_abort_and_shutdown_end_every_stream(tiny_checkpoint):
    engine = start(tiny_checkpoint("llama"))
    forever = SamplingParams(max_tokens=10_000, ignore_eos=True)
    aborted = engine.add_request("a", [4, 5, 6], forever)
    running = engine.add_request("b", [4, 5, 7], forever)
    next(iter(aborted))  # it has started
    engine.abort("a")
    assert collect(aborted)[1].finish_reason == "abort"
    engine.shutdown()
    assert collect(running)[1].finish_reason == "abort"
    assert engine.process.poll() is not None
    with pytest.raises(EngineError, match="shutting down"):
        engine.add_request("c", [4], forever)


def test_a_dead_child_fails_running_requests_and_refuses_new_ones(tiny_checkpoint):
    engine = start(tiny_checkpoint("llama"))
    stream = engine.add_request("a", [4, 5, 6], SamplingParams(max_tokens=10_000, ignore_eos=True))
    next(iter(stream))
    os.kill(engine.process.pid, signal.SIGKILL)
    _, last = collect(stream)
    assert last.finish_reason == "error" and "exited unexpectedly" in last.error and not last.error_code
    with pytest.raises(EngineError, match="exited unexpectedly"):
        engine.add_request("b", [4], SamplingParams())
    engine.shutdown()


def test_a_child_that_cannot_load_says_why(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"], "model_type": "nope"}')
    with pytest.raises(EngineError, match="failed to load"):
        start(tmp_path)
