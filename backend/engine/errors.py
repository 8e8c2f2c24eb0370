"""Exceptions that carry the name of the offending field, so servers can report them verbatim."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidParameterError(EngineError, ValueError):
    """A request or configuration value is out of range; `field` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnsupportedModelError(EngineError):
    """The checkpoint's architecture has no implementation here."""


class EngineOverloadedError(EngineError):
    """The bound on waiting requests is reached; the caller should retry later."""
