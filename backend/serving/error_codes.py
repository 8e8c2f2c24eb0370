"""Triton errors with codes, so HTTP clients get 400 for bad input and 503 for overload (error_code_name).

tritonserver maps the codes to HTTP statuses (INVALID_ARG 400, UNAVAILABLE 503, INTERNAL 500) and to gRPC
status codes. The Python backend's TritonError takes a code since r23.xx; with an older stub every error is
INTERNAL, as before. Triton-free: pb_utils is passed in.
"""
from __future__ import annotations

from backend.engine.errors import error_code_name  # noqa: F401  (where the serving layer finds it)


def triton_error(pb_utils, message: str, code_name: str = "INTERNAL"):
    """pb_utils.TritonError with the code when the stub supports codes, else without."""
    code = getattr(pb_utils.TritonError, code_name, None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)
