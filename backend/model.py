"""The `tritium` Python-based Triton backend: a thin adapter between Triton requests and the AsyncEngine.

Models say `backend: "tritium"` and have no model.py; tools/serve.py lays this file out as
`<backend_dir>/tritium/model.py` beside `<backend_dir>/python/`. It takes token ids from `preprocessing` (the
ensemble path) or the ensemble's own text inputs when called directly; a request of several prompts (batch rows)
or several sequences per prompt becomes one engine request per sequence (backend/serving/batching.py).
Decoupled: `execute` validates each request, hands it to the engine and returns at once; a few responder threads
(backend/serving/responder.py) stream every request's responses (the final flag on the last data response), poll
cancellation and abort the engine requests when the client goes away.
Engine settings come from the model config's `parameters` (every EngineConfig field, written by
tools/generate_repo.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from backend.engine.async_engine import AsyncEngine
from backend.engine.engine_process import EngineProcess
from backend.engine.errors import EngineError
from backend.engine.parallel.placement import GROUPS_KEY, instance_device_ids
from backend.serving.engine_settings import (declared_instances, engine_in_child, from_parameters,
                                             responder_threads, serving_settings)
from backend.serving.batching import (ResponseGroup, RunningRequests, is_stop_request, members, parse_rows,
                                      sequence_params, split_rows)
from backend.serving.error_codes import error_code_name, triton_error
from backend.serving.metrics import ServingMetrics
from backend.serving.preprocess import Preprocessor, tokenize_inputs
from backend.serving.request_parser import RequestLimits, parse_request
from backend.serving.responder import Responder
from backend.serving.session import Session

log = logging.getLogger("tritium")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
SHUTDOWN_JOIN_S = 10.0
HOLD_POLL_S = 0.005


class TritonSink:
    """Session -> Triton: responses through the request's response sender."""

    def __init__(self, request, sender):
        self.request = request
        self.sender = sender

    def send(self, outputs: dict[str, np.ndarray], final: bool) -> None:
        tensors = [pb_utils.Tensor(name, array) for name, array in outputs.items()]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

    def send_error(self, message: str, code_name: str = "INTERNAL") -> None:
        send_error(self.sender, message, code_name)

    def is_cancelled(self) -> bool:
        return self.request.is_cancelled()


def send_error(sender, message: str, code_name: str = "INTERNAL") -> None:
    error = triton_error(pb_utils, message, code_name)
    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the tritium backend needs model_transaction_policy { decoupled: true }")
        self.input_names = [i["name"] for i in model_config.get("input", [])]
        parameters = model_config.get("parameters", {})
        config = _select_device(from_parameters(parameters, args["model_repository"]), args, parameters)
        serving = serving_settings(parameters)
        # The step loop in its own process by default (engine_process.py says why); in this process on request
        self.engine = EngineProcess(config) if engine_in_child(serving) else AsyncEngine(config)
        # The tokenizer loads now (loading it on the first request stalled that stream for ~2 s). It also
        # serves requests sent to this model directly with text_input, the path on which client cancellation
        # reaches the engine (tritonserver 2.51 does not propagate cancellation into ensemble steps).
        chat = serving.get("apply_chat_template", "false").lower() == "true"
        self.preprocessor = Preprocessor(self.engine.tokenizer, apply_chat_template=chat)
        self.block_size = config.block_size
        self.limits = request_limits(self.engine, config.block_size)
        self._ids = itertools.count()
        instance = instance_label(args)
        self._prefix = f"{args['model_name']}-{instance}"
        self.responder = Responder(responder_threads(serving))
        self.running = RunningRequests()
        self.capacity = config.max_num_seqs
        self.hold_when_full = declared_instances(model_config) > 1
        self._stopping = False
        # One series per instance: gauges (running, waiting, KV blocks) of replicas must not overwrite each
        # other, and the spread of requests over instances shows in the per-instance counters.
        labels = {"model": args["model_name"], "version": str(args["model_version"]), "instance": instance}
        self.metrics = ServingMetrics(pb_utils, self.engine, labels).start()
        log.info("tritium engine ready: %s", json.dumps(config.to_dict()))

    def execute(self, requests):
        for request in requests:
            self.metrics.admit(self._start, request)  # counts a request that started no session
        if self.hold_when_full:
            self._wait_for_room()
        return None

    def _wait_for_room(self) -> None:
        """With several instances, a full one (as many streams as its engine batches) keeps Triton's scheduler
        thread until a stream ends, so the next request goes to an instance with room. Triton hands a request to
        whichever instance thread is free, and a decoupled execute returns at once, so one instance could take
        nearly all (2 GPUs, 512 requests: measured 1.64x one instance with the spread unseen; perf/RESULTS.md)."""
        while self.responder.active() >= self.capacity and not self._stopping:
            time.sleep(HOLD_POLL_S)

    def _start(self, request) -> None:
        """One engine request per prompt row and returned sequence (batching.py); every row is checked before
        any starts. A request with `stop` true aborts the running request of the same request id."""
        sender = request.get_response_sender()
        request_id = f"{self._prefix}-{next(self._ids)}"
        started: list[str] = []
        try:
            inputs = self._inputs(request)
            if is_stop_request(inputs):
                self._stop(request.request_id(), sender)
                return
            parameters = _parameters(request)
            rows = parse_rows(split_rows(inputs), lambda row: parse_request(
                tokenize_inputs(row, parameters, self.preprocessor), parameters, self.limits))
            plan = members([row.num_sequences for row in rows])
            ids = [request_id] if len(plan) == 1 else [f"{request_id}.{m.row}.{m.sequence}" for m in plan]
            streams = []
            for member_id, member in zip(ids, plan):
                params = sequence_params(rows[member.row].params, member.sequence)
                streams.append(self.engine.add_request(member_id, rows[member.row].prompt_ids, params))
                started.append(member_id)
        except Exception as exc:
            self._abort(started)
            if isinstance(exc, (EngineError, ValueError)):  # bad input names the field (400); overload/shutdown: 503
                send_error(sender, str(exc), error_code_name(exc))
            else:  # never leave a request without its final response
                log.exception("request %s could not start", request_id)
                send_error(sender, f"internal error: {type(exc).__name__}: {exc}")
            return
        client_id = request.request_id()
        self.running.add(client_id, ids)
        group = ResponseGroup(TritonSink(request, sender), len(plan), lambda: self._abort(ids),
                              on_close=lambda: self.running.remove(client_id, ids))
        for member_id, member, stream in zip(ids, plan, streams):
            self.responder.add(Session(self.engine, member_id, rows[member.row], stream, group.member(member.tags),
                                       self.block_size, self.metrics.observer()))

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)

    def _stop(self, client_id: str, sender) -> None:
        """Aborts the engine requests started for client_id (their streams end with a final response whose
        finish_reason is "abort") and answers the stop request with an empty final response."""
        if not client_id:
            send_error(sender, "stop: needs the request id of the request to stop", "INVALID_ARG")
            return
        self._abort(self.running.engine_ids(client_id))
        sender.send(flags=FINAL)

    def _inputs(self, request) -> dict[str, np.ndarray]:
        inputs = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        return inputs

    def finalize(self) -> None:
        """Aborts running requests (the responder sends their final responses), then stops the engine."""
        self._stopping = True
        self.metrics.stop()
        self.engine.shutdown()
        self.responder.stop(timeout=SHUTDOWN_JOIN_S)
        log.info("tritium engine stopped")


def instance_label(args: dict) -> str:
    """Triton's instance name, with the GPU for KIND_GPU: tritonserver 2.51 names one instance per listed GPU
    alike (llm_0_0 on GPU 0 and on GPU 1, seen on a 2-GPU machine), and their metrics then merged."""
    name = args["model_instance_name"]
    return f"{name}:gpu{args.get('model_instance_device_id', 0)}" if args.get("model_instance_kind") == "GPU" else name


def request_limits(engine, block_size: int) -> RequestLimits:
    """The context length and vocabulary every request is checked against before it reaches the engine."""
    kv_blocks = engine.stats().get("kv_blocks_total")
    return RequestLimits(max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                         kv_cache_tokens=kv_blocks * block_size if kv_blocks else None)


def _parameters(request) -> dict:
    try:
        return json.loads(request.parameters() or "{}")
    except ValueError:
        return {}


def _select_device(config, args: dict, parameters: dict):
    """A KIND_GPU instance runs on the GPU(s) Triton gave it, not GPU 0 for all (a known failure of other
    backends). By explicit device index (cuda:N and torch.cuda.set_device in the engine), not by setting
    CUDA_VISIBLE_DEVICES here: that only works if nothing in this stub process initialized CUDA first, and a
    tensor-parallel instance must see its peers' GPUs too. Indices are Triton's, so they honour a
    CUDA_VISIBLE_DEVICES given to tritonserver itself."""
    groups = parameters.get(GROUPS_KEY, {})
    groups = groups.get("string_value", "") if isinstance(groups, dict) else str(groups)
    device_ids = instance_device_ids(args.get("model_instance_kind"), int(args.get("model_instance_device_id", 0)),
                                     groups, config.tensor_parallel_size)
    return config if device_ids is None else dataclasses.replace(config, device=_cuda(config), device_ids=device_ids)


def _cuda(config) -> str:
    return "cuda" if config.device == "auto" else config.device
