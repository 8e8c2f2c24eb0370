"""Which Triton error code an exception becomes, so HTTP clients get 400 for bad input and 503 for overload.

tritonserver maps the codes to HTTP statuses (INVALID_ARG 400, UNAVAILABLE 503, INTERNAL 500) and to gRPC
status codes. The Python backend's TritonError takes a code since r23.xx; with an older stub every error is
INTERNAL, as before. Triton-free: pb_utils is passed in.
"""
from __future__ import annotations

from backend.engine.errors import EngineError, InvalidParameterError


def error_code_name(exc: BaseException) -> str:
    """The TritonError code name for an exception raised while starting a request.

    Bad input is the client's to fix (INVALID_ARG). The engine's other refusals at request start, the bound
    on waiting requests (EngineOverloadedError) and shutdown, pass: the client should retry (UNAVAILABLE)."""
    if isinstance(exc, (InvalidParameterError, ValueError)):
        return "INVALID_ARG"
    if isinstance(exc, EngineError):
        return "UNAVAILABLE"
    return "INTERNAL"


def triton_error(pb_utils, message: str, code_name: str = "INTERNAL"):
    """pb_utils.TritonError with the code when the stub supports codes, else without."""
    code = getattr(pb_utils.TritonError, code_name, None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)
