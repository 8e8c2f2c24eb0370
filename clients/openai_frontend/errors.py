"""Errors in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with an HTTP status.

Triton's streaming API carries an error as a message only (no status code), so messages are classified:
the tritium backend names the field at fault ("top_p: must be in (0, 1], got 1.5") -> 400; the engine's
overload message ("... retry later") and an unloaded model -> 503; anything else -> 500.
"""
from __future__ import annotations

import re

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 502: "server_error", 503: "service_unavailable"}

# Fields the backend and preprocessing name in their InvalidParameterError messages ("<field>: <problem>").
BACKEND_FIELDS = {
    "text_input", "max_tokens", "stream", "exclude_input_in_output", "stop_words", "bad_words", "end_id", "pad_id",
    "top_k", "min_tokens", "min_length", "beam_width", "num_return_sequences", "temperature", "top_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "random_seed", "return_log_probs",
    "prompt", "input_ids", "apply_chat_template", "ignore_eos", "request_id",
}
# The OpenAI parameter a backend field comes from, so `param` names what the client sent.
OPENAI_PARAM = {"text_input": "prompt", "input_ids": "prompt", "stop_words": "stop", "min_length": "min_tokens",
                "random_seed": "seed", "return_log_probs": "logprobs"}
ENSEMBLE_PREFIX = re.compile(r"^(\[request id: [^\]]*\]\s*)?(in ensemble '[^']*',\s*)?")
UNAVAILABLE = ("retry later", "overloaded", "is not ready", "unknown model", "is not found", "unavailable")
INVALID = ("unexpected", "expected", "invalid", "must be", "exceeds", "too long")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ERROR_TYPES.get(status, "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param)


def from_triton_message(message: str) -> OpenAIError:
    """Classifies an error message from tritonserver or the tritium backend."""
    text = ENSEMBLE_PREFIX.sub("", message.strip())
    lowered = text.lower()
    if "cancelled" in lowered:
        return OpenAIError(499, text, "server_error", code="cancelled")
    if any(s in lowered for s in UNAVAILABLE):
        return OpenAIError(503, text, "service_unavailable")
    if lowered.startswith(("internal error", "generation failed")):
        return OpenAIError(500, text, "server_error")
    field = re.match(r"^(\w+): ", text)
    if field and field.group(1) in BACKEND_FIELDS:
        name = field.group(1)
        code = "context_length_exceeded" if name == "prompt" and "max_model_len" in text else None
        return OpenAIError(400, text, "invalid_request_error", OPENAI_PARAM.get(name, name), code)
    if any(s in lowered for s in INVALID):
        return OpenAIError(400, text, "invalid_request_error")
    return OpenAIError(500, text, "server_error")
