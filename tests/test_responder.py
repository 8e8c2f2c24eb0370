"""The serving responder: a few threads streaming many sessions, with the engine's thread feeding their streams."""
import threading
import time

import pytest

from backend.engine.async_engine import RequestStream
from backend.engine.outputs import RequestOutput
from backend.serving.request_parser import parse_request
from backend.serving.responder import Responder
from backend.serving.session import Session
from tests.test_serving_units import FakeTokenizer, RecordingSink, engine_outputs, tensors, text

WAIT_S = 10.0


class AbortingEngine:
    """Like AsyncEngine.abort: the aborted request's stream receives a final 'abort' output."""

    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.streams: dict[str, RequestStream] = {}
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)
        self.streams[request_id].put(RequestOutput(request_id, [], None, True, "abort"))


def start(responder, engine, request_id, cancel_after=None, sink=None, **request_values):
    request = parse_request(tensors(exclude_input_in_output=True, **request_values))
    stream = engine.streams[request_id] = RequestStream(request_id)
    sink = sink or RecordingSink(cancel_after)
    responder.add(Session(engine, request_id, request, stream, sink, block_size=16))
    return stream, sink


def feed(stream, tokens, pause_s=0.001):
    """The engine's step thread: one output per step."""
    for out in engine_outputs(tokens):
        stream.put(out)
        time.sleep(pause_s)


def wait_until(condition):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "responder did not finish in time"
        time.sleep(0.005)


def test_many_sessions_stream_complete_and_correct():
    responder, engine = Responder(poll_s=0.01), AbortingEngine()
    tokens = [1, 2, 3, 4, 5, 6, 7, 0]
    sessions = [start(responder, engine, f"r{i}", stream=bool(i % 2)) for i in range(20)]
    feeders = [threading.Thread(target=feed, args=(stream, tokens)) for stream, _ in sessions]
    for thread in feeders:
        thread.start()
    for thread in feeders:
        thread.join()
    wait_until(lambda: responder.active() == 0)
    for stream, sink in sessions:
        assert [final for _, final in sink.sent].count(True) == 1 and sink.sent[-1][1] is True
        assert "".join(text(o) for o, _ in sink.sent) == "Hello world, how are you?" and not sink.errors
    responder.stop(timeout=1)


def test_stop_string_sends_one_final_and_ignores_the_late_abort_output():
    responder, engine = Responder(poll_s=0.01), AbortingEngine()
    stream, sink = start(responder, engine, "s", stream=True, stop_words=["w are"])
    feed(stream, [1, 2, 3, 4, 5, 6, 7])
    wait_until(lambda: responder.active() == 0)
    time.sleep(0.05)  # the abort output is still delivered and marks the session ready once more
    assert engine.aborted == ["s"] and not sink.errors
    assert [final for _, final in sink.sent].count(True) == 1
    assert "".join(text(o) for o, _ in sink.sent) == "Hello world, ho"
    # the thread is alive: a later request still streams
    stream2, sink2 = start(responder, engine, "t", stream=False)
    feed(stream2, [1, 2, 0])
    wait_until(lambda: responder.active() == 0)
    assert text(sink2.sent[-1][0]) == "Hello world"
    responder.stop(timeout=1)


def test_a_cancelled_client_is_found_by_the_sweep_without_any_output():
    responder, engine = Responder(poll_s=0.01), AbortingEngine()
    _, sink = start(responder, engine, "c", cancel_after=2, stream=True)
    wait_until(lambda: responder.active() == 0)
    assert engine.aborted == ["c"] and sink.errors == ["request cancelled by the client"]
    responder.stop(timeout=1)


class MeetingSink(RecordingSink):
    """A send that returns only once `barrier.parties` sends are in progress at the same time."""

    def __init__(self, barrier: threading.Barrier):
        super().__init__()
        self.barrier = barrier

    def send(self, outputs, final):
        self.barrier.wait(timeout=2)
        super().send(outputs, final)


def two_meeting_sessions(threads: int) -> list[MeetingSink]:
    """Two non-streamed requests whose sends must meet, on a responder with `threads` lanes; their sinks."""
    responder, engine = Responder(threads=threads, poll_s=0.01), AbortingEngine()
    barrier = threading.Barrier(2)
    sessions = [start(responder, engine, f"m{i}", sink=MeetingSink(barrier), stream=False) for i in range(2)]
    for stream, _ in sessions:
        feed(stream, [1, 2, 0])
    wait_until(lambda: responder.active() == 0)
    responder.stop(timeout=1)
    return [sink for _, sink in sessions]


def test_lanes_send_at_the_same_time():
    """The stub's send waits for tritonserver with the GIL released; two lanes must overlap their sends."""
    for sink in two_meeting_sessions(threads=2):  # a broken barrier (sends one after another) raised inside send
        assert not sink.errors and text(sink.sent[-1][0]) == "Hello world"


def test_one_lane_sends_one_at_a_time():
    """The barrier above can fail: with one lane the two sends cannot meet, and both requests fail loudly."""
    assert all(sink.errors and "BrokenBarrierError" in sink.errors[0] for sink in two_meeting_sessions(threads=1))


def test_sessions_spread_over_lanes():
    responder, engine = Responder(threads=3, poll_s=0.01), AbortingEngine()
    for i in range(6):
        start(responder, engine, f"p{i}", stream=True)
    assert sorted(lane.active() for lane in responder._lanes) == [2, 2, 2]
    for request_id in list(engine.streams):
        engine.abort(request_id)
    wait_until(lambda: responder.active() == 0)
    responder.stop(timeout=1)
    with pytest.raises(ValueError, match="at least 1"):
        Responder(threads=0)
