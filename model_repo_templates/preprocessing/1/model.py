"""preprocessing: text_input -> input_ids and input_lengths (chat template when asked), bad_words -> bad_words_ids.

The chat template applies when the model config's `apply_chat_template` parameter is true (set at generate
time) or the request carries the parameter `apply_chat_template` (true/false), which wins. Bad input (empty
or oversized text, invalid UTF-8, too many bad words) fails only its own request, as INVALID_ARG naming the
input; the ensemble passes that error to the client (HTTP 400).
"""
import json
import logging
import os

import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from backend.engine.errors import InvalidParameterError
from backend.serving.error_codes import triton_error
from backend.serving.preprocess import Preprocessor, parse_bool_parameter, preprocess_rows

log = logging.getLogger("tritium.preprocessing")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        tokenizer_dir = os.path.join(args["model_repository"], params["tokenizer_dir"])
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.pre = Preprocessor(tokenizer, params.get("apply_chat_template", "false").lower() == "true")

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        """One request's response; an error fails this request only, never the others of its batch."""
        try:
            return self._process(request)
        except (InvalidParameterError, ValueError) as exc:
            return _error_response(str(exc), "INVALID_ARG")
        except Exception as exc:  # a tokenizer fault must not take the batch down
            log.exception("preprocessing failed")
            return _error_response(f"preprocessing failed: {type(exc).__name__}: {exc}", "INTERNAL")

    def _process(self, request):
        """A request may carry several prompts (one per batch row): each is tokenized on its own."""
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
        bad = pb_utils.get_input_tensor_by_name(request, "bad_words")
        chat = parse_bool_parameter(_parameters(request), "apply_chat_template")
        outputs = preprocess_rows(self.pre, text, None if bad is None else bad.as_numpy(), chat)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def _parameters(request) -> dict:
    try:
        parameters = json.loads(request.parameters() or "{}")
    except ValueError:
        return {}
    return parameters if isinstance(parameters, dict) else {}


def _error_response(message, code_name):
    return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(pb_utils, message, code_name))
