"""vllm_model: the vLLM backend's interface in front of the engine model (backend/serving/vllm_interface.py).

Each request is forwarded to the engine model as a streamed BLS request (the engine stays one, shared with the
ensemble) from a thread of its own, since decoupled BLS responses arrive by blocking iteration. Bad input fails
only its own request as INVALID_ARG naming the parameter; an engine error ends the request with its message
and code; a client that cancels gets CANCELLED, and its engine request is stopped (the engine model's `stop`).
"""
import json
import logging
import os
import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from backend.engine.errors import InvalidParameterError
from backend.serving.error_codes import triton_error
from backend.serving.request_parser import decode_text
from backend.serving.vllm_interface import (ENGINE_OUTPUTS, RETURN_FLAGS, VllmResponses, engine_delta,
                                            parse_vllm_request)

log = logging.getLogger("tritium.vllm_model")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.engine_model = params["engine_model"]
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(args["model_repository"], params["tokenizer_dir"]))
        self.decode_token = lambda token_id: tokenizer.decode([token_id])

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True, name="vllm-request").start()
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            self._forward(request, sender)
        except InvalidParameterError as exc:
            sender.send(_error(str(exc), "INVALID_ARG"), flags=FINAL)
        except EngineModelError as exc:
            sender.send(_error(exc.message, exc.code_name), flags=FINAL)
        except Exception as exc:  # never leave a request without its final response
            log.exception("vllm_model request failed")
            sender.send(_error(f"internal error: {type(exc).__name__}: {exc}", "INTERNAL"), flags=FINAL)

    def _forward(self, request, sender):
        parsed = parse_vllm_request(
            prompt=decode_text(_value(request, "text_input"), "text_input"),
            stream=bool(_value(request, "stream", False)),
            exclude_input_in_output=_optional_bool(request, "exclude_input_in_output"),
            sampling_parameters=_optional_text(request, "sampling_parameters"),
            request_parameters=request.parameters(),
            flags={name: bool(_value(request, name, False)) for name in RETURN_FLAGS})
        engine_id = f"vllm-{uuid.uuid4().hex}"
        engine_request = pb_utils.InferenceRequest(
            model_name=self.engine_model, requested_output_names=list(ENGINE_OUTPUTS), request_id=engine_id,
            inputs=[pb_utils.Tensor(name, array) for name, array in parsed.engine_inputs.items()],
            parameters=parsed.engine_parameters)
        folded = VllmResponses(parsed, self.decode_token)
        responses = engine_request.exec(decoupled=True)
        for response in responses:
            if request.is_cancelled():
                self._stop(engine_id)
                for _ in responses:  # the engine model ends the stopped request's stream
                    pass
                sender.send(_error("request cancelled by the client", "CANCELLED"), flags=FINAL)
                return
            if response.has_error():
                raise EngineModelError(response.error())
            arrays = {name: tensor.as_numpy() for name in ENGINE_OUTPUTS
                      if (tensor := pb_utils.get_output_tensor_by_name(response, name)) is not None}
            if "text_output" not in arrays:  # an empty final response
                continue
            streamed = folded.add(engine_delta(arrays))
            if streamed is not None:
                sender.send(_response(streamed), flags=FINAL if folded.finished else 0)
        if not parsed.stream:
            sender.send(_response(folded.whole()), flags=FINAL)
        elif not folded.finished:  # the engine ended without finishing every sequence: still end the request
            sender.send(flags=FINAL)

    def _stop(self, engine_id: str) -> None:
        """Stops the engine request with the engine model's `stop` request (tritonserver 2.51 has no way to cancel
        a BLS request), as the TensorRT-LLM backend's BLS model stops its engine requests."""
        inputs = {"text_input": np.array([[b""]], dtype=np.object_), "max_tokens": np.array([[1]], dtype=np.int32),
                  "stop": np.array([[True]])}
        stop = pb_utils.InferenceRequest(model_name=self.engine_model, requested_output_names=[], request_id=engine_id,
                                         inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()])
        for response in stop.exec(decoupled=True):
            if response.has_error():
                log.warning("stopping %s failed: %s", engine_id, response.error().message())


class EngineModelError(Exception):
    """An error response of the engine model, passed on with its code (400 stays 400)."""

    def __init__(self, error):
        super().__init__(error.message())
        self.message = error.message()
        code = error.code() if hasattr(error, "code") else None
        self.code_name = next((name for name in ("INVALID_ARG", "UNAVAILABLE", "CANCELLED")
                               if code is not None and code == getattr(pb_utils.TritonError, name, None)), "INTERNAL")


def _value(request, name: str, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    array = tensor.as_numpy()
    if array.size != 1:
        raise InvalidParameterError(name, f"expected one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _optional_bool(request, name: str):
    value = _value(request, name)
    return None if value is None else bool(value)


def _optional_text(request, name: str):
    value = _value(request, name)
    return None if value is None else decode_text(value, name)


def _response(outputs: dict) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, np.asarray(v)) for k, v in outputs.items()])


def _error(message: str, code_name: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(pb_utils, message, code_name))
