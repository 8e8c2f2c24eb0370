"""postprocessing: passes the engine's response fields through as the ensemble's outputs.

The engine model already produced the text deltas (it owns the incremental detokenizer, so stop strings
are matched across token boundaries and no space or multi-byte character is lost); this step is where any
final formatting of text_output would go. Optional fields are passed only when the engine sent them.
Its inputs come from the engine, not the client, but it still checks them: a response without text_output
or with text that is not UTF-8 is an INTERNAL error for that request only, never a crash of the batch.
"""
import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from backend.serving.error_codes import triton_error

log = logging.getLogger("tritium.postprocessing")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            return pb_utils.InferenceResponse(output_tensors=self._tensors(request))
        except Exception as exc:
            log.exception("postprocessing failed")
            error = triton_error(pb_utils, f"postprocessing failed: {type(exc).__name__}: {exc}", "INTERNAL")
            return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def _tensors(self, request):
        tensors = []
        for name in self.names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors.append(pb_utils.Tensor(name, _as_sent(name, tensor.as_numpy())))
        if not any(t.name() == "text_output" for t in tensors):
            raise ValueError("the engine's response has no text_output")
        _check_utf8(next(t for t in tensors if t.name() == "text_output").as_numpy())
        return tensors


def _as_sent(name: str, array: np.ndarray) -> np.ndarray:
    """text_output leaves the ensemble one-dimensional, one string per request, as the TensorRT-LLM backend's
    postprocessing sends it: NVIDIA's clients read `as_numpy("text_output")[0].decode()` and Triton's OpenAI
    frontend `to_string_array()[0]`, which the engine's [batch, 1] array breaks. (The engine's own output keeps
    [batch, 1]: the ensemble checks it against this model's input dims.) The other fields keep their shapes."""
    return array.reshape(-1) if name == "text_output" else array


def _check_utf8(text: np.ndarray) -> None:
    for value in text.reshape(-1):
        if isinstance(value, bytes):
            value.decode("utf-8")  # UnicodeDecodeError -> this request's INTERNAL error
