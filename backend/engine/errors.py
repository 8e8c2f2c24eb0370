"""Exceptions that carry the name of the offending field, so servers can report them verbatim."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidParameterError(EngineError, ValueError):
    """A request or configuration value is out of range; `field` names it and `reason` says what was expected
    (tools that set the value by a flag of another name report the flag with the reason)."""

    def __init__(self, field: str, message: str):
        self.field, self.reason = field, message
        super().__init__(f"{field}: {message}")


class UnsupportedModelError(EngineError):
    """The checkpoint's architecture has no implementation here."""


class EngineOverloadedError(EngineError):
    """The bound on waiting requests is reached; the caller should retry later."""


def error_code_name(exc: BaseException) -> str:
    """The Triton error code name for an exception raised while starting a request.

    Bad input is the client's to fix (INVALID_ARG). The engine's other refusals at request start, the bound
    on waiting requests (EngineOverloadedError) and shutdown, pass: the client should retry (UNAVAILABLE).
    tritonserver maps the codes to HTTP statuses (400, 503, 500 for INTERNAL) and to gRPC status codes."""
    if isinstance(exc, (InvalidParameterError, ValueError)):
        return "INVALID_ARG"
    if isinstance(exc, EngineError):
        return "UNAVAILABLE"
    return "INTERNAL"
