"""Turns the tensors of one Triton request (name -> numpy array) into what the engine needs.

Triton-free, so it is unit-tested without a server. Every error names the input tensor at fault.
Names follow the TensorRT-LLM backend's interface (INTERFACE.md); the old names genai-perf and older clients
send (`min_length`, `random_seed`) are accepted as aliases of `min_tokens` and `seed`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backend.engine.errors import InvalidParameterError
from backend.engine.sampling_params import SamplingParams

# Accepted for compatibility but without effect: pad_id (no padding in a ragged engine), length_penalty
# (beam search only, and beam_width must be 1).
IGNORED_INPUTS = ("pad_id", "length_penalty")
UNSUPPORTED_FLAGS = ("return_context_logits", "return_generation_logits")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    echo_text: str = ""  # prompt text prepended to a non-streamed answer (exclude_input_in_output false)
    stop_strings: list[str] = field(default_factory=list)
    return_log_probs: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    return_perf_metrics: bool = False


def parse_request(inputs: dict[str, np.ndarray], parameters: dict | None = None) -> GenerationRequest:
    """inputs: tensors by name (batch dimension included, batch size 1); parameters: Triton request parameters."""
    parameters = parameters or {}
    prompt_ids = _token_ids(inputs, "input_ids")
    stream = _bool(inputs, "stream", False)
    exclude_input = _bool(inputs, "exclude_input_in_output", False)
    echo = "" if stream or exclude_input else _text(inputs, "text_input")
    _reject_unsupported(inputs)
    return GenerationRequest(
        prompt_ids=prompt_ids,
        params=_sampling_params(inputs, parameters),
        stream=stream,
        echo_text=echo,
        stop_strings=[s for s in _strings(inputs, "stop_words") if s],
        return_log_probs=_bool(inputs, "return_log_probs", False),
        return_num_input_tokens=_bool(inputs, "return_num_input_tokens", False),
        return_num_output_tokens=_bool(inputs, "return_num_output_tokens", False),
        return_perf_metrics=_bool(inputs, "return_perf_metrics", False),
    )


def _sampling_params(inputs: dict[str, np.ndarray], parameters: dict) -> SamplingParams:
    end_id = _int(inputs, "end_id", None)
    return SamplingParams(
        max_tokens=_int(inputs, "max_tokens", None, required=True),
        min_tokens=_int(inputs, "min_tokens", None, alias="min_length") or 0,
        temperature=_float(inputs, "temperature", 0.0),
        top_k=_int(inputs, "top_k", 0),
        top_p=_float(inputs, "top_p", 1.0),
        repetition_penalty=_float(inputs, "repetition_penalty", 1.0),
        presence_penalty=_float(inputs, "presence_penalty", 0.0),
        frequency_penalty=_float(inputs, "frequency_penalty", 0.0),
        seed=_int(inputs, "seed", None, alias="random_seed"),
        end_ids=[end_id] if end_id is not None else [],
        ignore_eos=_parameter_bool(parameters, "ignore_eos", False),
        bad_token_sequences=_word_list(inputs, "bad_words_ids"),
        logprobs=_bool(inputs, "return_log_probs", False),
        beam_width=_int(inputs, "beam_width", 1),
        n=_int(inputs, "num_return_sequences", 1),
    )


def _reject_unsupported(inputs: dict[str, np.ndarray]) -> None:
    for name in UNSUPPORTED_FLAGS:
        if _bool(inputs, name, False):
            raise InvalidParameterError(name, "is not supported by this backend; send false or leave it out")
    words = [w for w in _strings(inputs, "embedding_bias_words") if w]
    weights = inputs.get("embedding_bias_weights")
    if words or (weights is not None and np.any(np.asarray(weights) != 0)):
        raise InvalidParameterError("embedding_bias_words", "embedding bias is not supported by this backend")


def _value(inputs: dict[str, np.ndarray], name: str, alias: str | None = None):
    """The single value of a per-request scalar input, or None when absent."""
    key = name if name in inputs else alias if alias in inputs else None
    if key is None:
        return None
    array = np.asarray(inputs[key])
    if array.size != 1:
        raise InvalidParameterError(key, f"expected one value per request (batch size 1), got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _int(inputs, name: str, default, required: bool = False, alias: str | None = None):
    value = _value(inputs, name, alias)
    if value is None:
        if required:
            raise InvalidParameterError(name, "is required")
        return default
    if not np.issubdtype(np.asarray(value).dtype, np.integer):
        raise InvalidParameterError(name, f"must be an integer tensor, got {np.asarray(value).dtype}")
    return int(value)


def _float(inputs, name: str, default: float) -> float:
    value = _value(inputs, name)
    if value is None:
        return default
    if not np.issubdtype(np.asarray(value).dtype, np.number):
        raise InvalidParameterError(name, f"must be a number, got {np.asarray(value).dtype}")
    return float(value)


def _bool(inputs, name: str, default: bool) -> bool:
    value = _value(inputs, name)
    return default if value is None else bool(value)


def _text(inputs, name: str) -> str:
    value = _value(inputs, name)
    return "" if value is None else _decode(value, name)


def _strings(inputs, name: str) -> list[str]:
    """A list-of-strings input; a single string may also hold a comma-free word, as clients send "" for none."""
    if name not in inputs:
        return []
    return [_decode(v, name) for v in np.asarray(inputs[name]).reshape(-1)]


def _decode(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidParameterError(name, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return str(value)


def _token_ids(inputs, name: str) -> list[int]:
    if name not in inputs:
        raise InvalidParameterError(name, "is required")
    array = np.asarray(inputs[name])
    if array.ndim == 2 and array.shape[0] != 1:
        raise InvalidParameterError(name, f"batch size must be 1 per request, got {array.shape[0]}")
    return [int(t) for t in array.reshape(-1)]


def _word_list(inputs, name: str) -> list[list[int]]:
    """TensorRT-LLM word-list format [batch, 2, L]: row 0 the concatenated ids, row 1 their end offsets
    padded with -1."""
    if name not in inputs:
        return []
    array = np.asarray(inputs[name])
    array = array.reshape(array.shape[-2:]) if array.ndim >= 2 else array
    if array.ndim != 2 or array.shape[0] != 2:
        raise InvalidParameterError(name, f"expected shape [1, 2, L], got {list(np.asarray(inputs[name]).shape)}")
    ids, ends = array[0].tolist(), [int(e) for e in array[1] if e >= 0]
    sequences, start = [], 0
    for end in ends:
        if end > start:
            sequences.append([int(t) for t in ids[start:end]])
        start = end
    return sequences


def _parameter_bool(parameters: dict, name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise InvalidParameterError(name, f"must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)
