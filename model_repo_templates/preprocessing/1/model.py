"""preprocessing: text_input -> input_ids (chat template when asked), bad_words -> bad_words_ids.

The chat template applies when the model config's `apply_chat_template` parameter is true (set at generate
time) or the request carries the parameter `apply_chat_template` (true/false), which wins.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from backend.engine.errors import InvalidParameterError
from backend.serving.preprocess import Preprocessor, parse_bool_parameter


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        tokenizer_dir = os.path.join(args["model_repository"], params["tokenizer_dir"])
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.pre = Preprocessor(tokenizer, params.get("apply_chat_template", "false").lower() == "true")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._process(request))
            except (InvalidParameterError, ValueError) as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses

    def _process(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
        if text.size != 1:
            raise InvalidParameterError("text_input", f"one prompt per request (batch size 1), got shape {list(text.shape)}")
        prompt = _decode(text.reshape(-1)[0], "text_input")
        parameters = json.loads(request.parameters() or "{}")
        ids = self.pre.encode(prompt, parse_bool_parameter(parameters, "apply_chat_template"))
        bad = pb_utils.get_input_tensor_by_name(request, "bad_words")
        words = [] if bad is None else [_decode(w, "bad_words") for w in bad.as_numpy().reshape(-1)]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int32)),
            pb_utils.Tensor("bad_words_ids", self.pre.word_list(words)),
        ])


def _decode(value, name):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidParameterError(name, "is not valid UTF-8") from None
    return str(value)
