"""The engine in a child process: the server's process keeps requests and responses, the child steps.

Why: on an H100 (perf/RESULTS.md) the mixed workload through tritonserver, with the engine's step thread inside
the Python stub, ran at 34% of the offline engine, and adding response threads made it slower (3,203 tok/s
with 1, 2,037 with 8) while each response still carried ~1 token: the step loop shared one GIL with the threads
that build and send responses and lost time waiting for it. And requests were added one per step: each
add_request waited for the step lock, so 256 arriving requests took ~256 steps to be admitted (TTFT p50 ~4 s).
The remedy follows vLLM V1's engine-core process and SGLang's scheduler process (the idea; the code is ours):
a process that only steps, fed through a socket.

Here the child's main thread owns the LLMEngine outright (no lock): between steps it applies every command that
arrived (all waiting adds enter the same step), runs a step, and sends that step's outputs as one message.
A receiver thread only reads the socket. The parent (EngineProcess, same interface as AsyncEngine) sends
commands without waiting, routes outputs to each request's RequestStream from one reader thread, and serves
stats() from the latest snapshot the child pushes (at most STATS_PERIOD_S old, and sent whenever it goes idle).
A request the engine refuses (bad input it alone can check, the waiting bound) gets a final output carrying
the error and its Triton code, so the client still gets 400 or 503.

Messages are length-prefixed JSON (multiprocessing.connection framing on a socketpair): never pickle.
  parent -> child: {"op": "add", "request_id", "prompt", "params"}, {"op": "abort", "request_id"},
                   {"op": "shutdown"}
  child -> parent: {"ready": info} or {"failed": traceback} once; then {"outputs": [...], "stats": {...}}
                   (either key optional); {"bye": true} last.
Lifetime: the child watches the parent's pid and exits when it is gone; shutdown() asks, then SIGTERM/SIGKILL.
If the child dies, every running request ends with an error and new ones are refused (UNAVAILABLE).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from .async_engine import RequestStream
from .config import EngineConfig
from .errors import EngineError, InvalidParameterError, error_code_name
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)

STATS_PERIOD_S = 0.1
IDLE_WAIT_S = 0.05
SHUTDOWN_WAIT_S = 15.0
OUTPUT_FIELDS = [f.name for f in dataclasses.fields(RequestOutput)]


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def output_to_list(output: RequestOutput) -> list:
    return [getattr(output, name) for name in OUTPUT_FIELDS]


# ---- the parent side ----------------------------------------------------------------------------------------

class EngineProcess:
    """AsyncEngine's interface, with the LLMEngine in a child process (see the module's docstring)."""

    def __init__(self, config: EngineConfig):
        from .checkpoint import resolve_checkpoint
        from .parallel.workers import REPO_ROOT, child_environment, python_executable

        # Resolved here, once (converting a GGUF if need be), so the child and the tokenizer read the same folder
        checkpoint = resolve_checkpoint(config.model or None)
        config = dataclasses.replace(config, model=str(checkpoint))
        ours, theirs = socket.socketpair()
        env = child_environment()
        argv = [python_executable(), "-m", "backend.engine.engine_process", "--fd", str(theirs.fileno()),
                "--parent-pid", str(os.getpid())]
        self.process = subprocess.Popen(argv, env=env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL,
                                        pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}
        self._streams_lock = threading.Lock()
        self._failure: str | None = None
        self._stopping = False
        self._bye = threading.Event()
        try:
            self._send({"config": config.to_dict()})
            info = self._wait_ready()
        except BaseException:
            self._kill()
            raise
        self.max_model_len: int = info["max_model_len"]
        self.eos_token_ids: list[int] = info["eos_token_ids"]
        self.vocab_size: int = info["vocab_size"]
        self._stats: dict = info["stats"]
        self._checkpoint = checkpoint
        self._tokenizer = None
        self._reader = threading.Thread(target=self._read, name="tritium-engine-reader", daemon=True)
        self._reader.start()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .checkpoint import load_tokenizer

            self._tokenizer = load_tokenizer(self._checkpoint)
        return self._tokenizer

    def _wait_ready(self) -> dict:
        """Blocks while the child loads the model (minutes for a large checkpoint) and warms up."""
        try:
            message = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            code = self.process.wait()
            raise EngineError(f"the engine process exited with code {code} while loading (its log is above)") from None
        if "failed" in message:
            raise EngineError(f"the engine process failed to load: {message['failed']}")
        return message["ready"]

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Returns at once. A refusal by the engine arrives as the stream's final output (error, error_code)."""
        if self._stopping:
            raise EngineError("the engine is shutting down")
        self._raise_if_failed()
        stream = RequestStream(request_id)
        with self._streams_lock:
            if request_id in self._streams:
                raise InvalidParameterError("request_id", f"{request_id!r} is already running")
            self._streams[request_id] = stream
        self._send({"op": "add", "request_id": request_id, "prompt": [int(t) for t in prompt_token_ids],
                    "params": dataclasses.asdict(params)})
        return stream

    def abort(self, request_id: str) -> None:
        """Asks the child to free the request's KV blocks; its stream then receives a final 'abort' output."""
        if self._failure is None:
            self._send({"op": "abort", "request_id": request_id})

    def stats(self) -> dict:
        return dict(self._stats)

    def shutdown(self, timeout: float = SHUTDOWN_WAIT_S) -> None:
        """Aborts what is still running (the streams get their final outputs), then ends the child."""
        self._stopping = True
        if self._failure is None:
            try:
                self._send({"op": "shutdown"})
                self._bye.wait(timeout)
            except EngineError:
                pass
        self._reader.join(timeout=2)
        self._kill()

    def _send(self, message: dict) -> None:
        data = encode(message)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except OSError as exc:
            raise EngineError(f"the engine process is gone: {exc}") from None

    def _read(self) -> None:
        try:
            while True:
                message = json.loads(self._conn.recv_bytes())
                if "outputs" in message:
                    self._deliver([RequestOutput(*fields) for fields in message["outputs"]])
                if "stats" in message:
                    self._stats = message["stats"]
                if message.get("bye"):
                    self._bye.set()
                    return
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("engine process reader")
        self._child_gone()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._streams_lock:
            targets = [(self._streams.pop(o.request_id, None) if o.finished else self._streams.get(o.request_id), o)
                       for o in outputs]
        for stream, output in targets:
            if stream is not None:
                stream.put(output)

    def _child_gone(self) -> None:
        """The child exited without saying bye: fail every running request, refuse new ones."""
        code = self.process.wait()
        self._failure = f"the engine process exited unexpectedly (code {code}); the model must be reloaded"
        log.error("%s", self._failure)
        with self._streams_lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(RequestOutput(stream.request_id, [], None, True, "error", error=self._failure))
        self._bye.set()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise EngineError(self._failure)

    def _kill(self) -> None:
        from .parallel.workers import _kill_all

        try:
            self.process.wait(timeout=SHUTDOWN_WAIT_S if self._bye.is_set() else 0.1)
        except subprocess.TimeoutExpired:
            pass
        _kill_all([self.process])
        self._conn.close()


# ---- the child side -----------------------------------------------------------------------------------------

class EngineLoop:
    """The child's main thread: apply commands, step, send outputs; the LLMEngine is touched only here."""

    def __init__(self, conn: Connection, engine):
        self.conn = conn
        self.engine = engine
        self.inbox: queue.SimpleQueue[dict | None] = queue.SimpleQueue()  # None: the parent is gone
        self._last_stats = 0.0
        self._sent_stats: dict | None = None
        threading.Thread(target=self._receive, name="tritium-engine-receiver", daemon=True).start()

    def _receive(self) -> None:
        try:
            while True:
                self.inbox.put(json.loads(self.conn.recv_bytes()))
        except (EOFError, OSError):
            self.inbox.put(None)

    def run(self) -> None:
        while True:
            outputs: list[RequestOutput] = []
            busy = self.engine.has_unfinished()
            for message in self._take_commands(wait=not busy):
                if message is None or message["op"] == "shutdown":
                    self._shut_down(outputs, say_bye=message is not None)
                    return
                self._apply(message, outputs)
            if self.engine.has_unfinished():
                outputs += self._step()
            self._send(outputs, idle=not self.engine.has_unfinished())

    def _take_commands(self, wait: bool) -> list[dict | None]:
        """Everything that arrived; when idle, first waits a little for something to arrive."""
        messages = []
        try:
            messages.append(self.inbox.get(timeout=IDLE_WAIT_S) if wait else self.inbox.get_nowait())
            while True:
                messages.append(self.inbox.get_nowait())
        except queue.Empty:
            return messages

    def _apply(self, message: dict, outputs: list[RequestOutput]) -> None:
        request_id = message["request_id"]
        if message["op"] == "abort":
            output = self.engine.abort_request(request_id)
            if output is not None:
                outputs.append(output)
            return
        try:
            self.engine.add_request(request_id, message["prompt"], SamplingParams(**message["params"]))
        except Exception as exc:  # refused: the request's one and final output says why, with its code
            outputs.append(RequestOutput(request_id, [], None, True, "error", error=str(exc),
                                         error_code=error_code_name(exc)))

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # a fault fails the affected requests, never the server silently
            log.error("engine step failed: %s", traceback.format_exc())
            return self.engine.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")

    def _send(self, outputs: list[RequestOutput], idle: bool, force_stats: bool = False) -> None:
        """Outputs, and the stats when due: at most every STATS_PERIOD_S while stepping; when idle, once changed."""
        message: dict = {}
        if outputs:
            message["outputs"] = [output_to_list(o) for o in outputs]
        now = time.monotonic()
        if force_stats or idle or now - self._last_stats >= STATS_PERIOD_S:
            stats = self.engine.stats()
            if force_stats or not idle or stats != self._sent_stats:
                message["stats"] = self._sent_stats = stats
                self._last_stats = now
        if message:
            self.conn.send_bytes(encode(message))

    def _shut_down(self, outputs: list[RequestOutput], say_bye: bool) -> None:
        outputs += self.engine.abort_all()
        self.engine.shutdown()  # stops tensor-parallel workers: none may outlive the instance
        if say_bye:
            self._send(outputs, idle=True, force_stats=True)
            self.conn.send_bytes(encode({"bye": True}))


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the engine process (started by EngineProcess)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tritium-engine %(levelname)s %(message)s")
    from .parallel.worker import watch_parent

    watch_parent(args.parent_pid)
    conn = Connection(args.fd)
    try:
        import torch

        from .engine import LLMEngine

        config = EngineConfig.from_dict(json.loads(conn.recv_bytes())["config"])
        engine = LLMEngine(config)
        info = {"max_model_len": engine.max_model_len, "eos_token_ids": engine.eos_token_ids,
                "vocab_size": engine.model_config.vocab_size, "stats": engine.stats()}
    except Exception:
        conn.send_bytes(encode({"failed": traceback.format_exc()}))
        return 1
    conn.send_bytes(encode({"ready": info}))
    with torch.inference_mode():
        EngineLoop(conn, engine).run()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
