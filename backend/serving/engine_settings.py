"""EngineConfig <-> the string `parameters` of a Triton model config.

The generator writes every EngineConfig field into the engine model's config.pbtxt; the backend reads them
back. The dataclass stays the single source of defaults and validation: an unknown key or a bad value is an
InvalidParameterError naming it, at generate time and again at load.
"""
from __future__ import annotations

import dataclasses
import os

from backend.engine.config import EngineConfig
from backend.engine.errors import InvalidParameterError

NONE = ""  # how None is written: Triton parameters are strings
# Settings of the serving layer (not the engine) that the engine model's config may also carry.
# instance_gpu_groups: parallel/placement.py; responder_threads: serving/responder.py; engine_process:
# engine/engine_process.py (the step loop in a child process, "true" unless "false")
SERVING_KEYS = ("apply_chat_template", "instance_gpu_groups", "responder_threads", "engine_process")
DEFAULT_RESPONDER_THREADS = 4


def to_parameters(config: EngineConfig) -> dict[str, str]:
    return {name: _format(value) for name, value in config.to_dict().items()}


def serving_settings(parameters: dict) -> dict[str, str]:
    """The SERVING_KEYS among a model config's parameters, as plain strings."""
    return {k: (v.get("string_value", "") if isinstance(v, dict) else str(v))
            for k, v in parameters.items() if k in SERVING_KEYS}


def responder_threads(serving: dict[str, str]) -> int:
    """responder_threads from serving_settings; absent (repositories generated before it existed): the default."""
    text = serving.get("responder_threads", "").strip()
    try:
        threads = int(text) if text else DEFAULT_RESPONDER_THREADS
    except ValueError:
        threads = 0
    if threads < 1:
        raise InvalidParameterError("responder_threads", f"expected a whole number of at least 1, got {text!r}")
    return threads


def engine_in_child(serving: dict[str, str]) -> bool:
    text = serving.get("engine_process", "true").strip().lower()
    if text not in ("true", "false"):
        raise InvalidParameterError("engine_process", f"expected true or false, got {text!r}")
    return text == "true"


def declared_instances(model_config: dict) -> int:
    """Instances the model config declares: count per group, times its GPUs when it lists them (a KIND_GPU
    group without a list runs count on every visible GPU: counted once, as this stays Triton- and CUDA-free)."""
    return sum(int(group.get("count", 1)) * max(1, len(group.get("gpus") or []))
               for group in model_config.get("instance_group") or [{}])


def from_parameters(parameters: dict[str, str], model_dir: str | None = None) -> EngineConfig:
    """Parses Triton's {key: {"string_value": v}} or plain {key: v}; a relative `model` is under model_dir.
    SERVING_KEYS are skipped (see serving_settings); any other unknown key is an error naming it."""
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    values = {}
    for key, raw in parameters.items():
        if key in SERVING_KEYS:
            continue
        if key not in fields:
            raise InvalidParameterError(key, f"unknown engine setting; known: {', '.join(sorted(fields))}")
        text = raw.get("string_value", "") if isinstance(raw, dict) else str(raw)
        values[key] = parse_value(fields[key], text)
    model = values.get("model")
    if model and model_dir and not os.path.isabs(model):
        values["model"] = os.path.join(model_dir, model)
    return EngineConfig.from_dict(values)


def parse_value(f: dataclasses.Field, text: str):
    """Converts a string by the field's declared type ("int", "float | None", "bool", "str")."""
    kind = str(f.type).replace(" ", "")
    optional = "None" in kind.split("|")
    if text.strip().lower() in (NONE, "none", "null") and optional:
        return None
    base = kind.split("|")[0]
    try:
        if base == "bool":
            return _parse_bool(text)
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
    except ValueError:
        raise InvalidParameterError(f.name, f"expected {base}, got {text!r}") from None
    return text


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return value in ("true", "1", "yes")


def _format(value) -> str:
    if value is None:
        return NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
