"""Turns the tensors of one Triton request (name -> numpy array) into what the engine needs.

Triton-free, so it is unit-tested (and fuzzed) without a server. Every error is an InvalidParameterError
whose message starts with the input tensor at fault and states the limit; the backend returns it as a
Triton INVALID_ARG error (HTTP 400). Names follow the TensorRT-LLM backend's interface (INTERFACE.md); the
old names genai-perf and older clients send (`min_length`, `random_seed`) are accepted as aliases of
`min_tokens` and `seed`, and an error about them names the alias the client sent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from backend.engine.errors import InvalidParameterError
from backend.engine.sampling_params import MAX_STOP_SEQUENCES, SamplingParams

# Accepted for compatibility but without effect: pad_id (no padding in a ragged engine), length_penalty
# (beam search only, and beam_width must be 1). They are still checked to be one sane value.
IGNORED_INPUTS = ("pad_id", "length_penalty")
UNSUPPORTED_FLAGS = ("return_context_logits", "return_generation_logits")
# A stop string is matched against the tail of the text at every step: its length bounds that work.
MAX_STOP_WORD_BYTES = 256
# Each returned sequence is an engine request of its own (batching.py): this bounds what one prompt can start.
MAX_RETURN_SEQUENCES = 64


@dataclass(frozen=True)
class RequestLimits:
    """What the loaded model allows; None: unknown (unit tests), that check is left to the engine."""

    max_model_len: int | None = None
    vocab_size: int | None = None
    kv_cache_tokens: int | None = None  # what the whole KV cache holds: one request can never grow past it

    def context(self) -> tuple[int | None, str]:
        """The most tokens (prompt + output) one request may have, and what sets that bound."""
        bounds = [(n, what) for n, what in ((self.max_model_len, "max_model_len"),
                                            (self.kv_cache_tokens, "KV cache capacity")) if n is not None]
        return min(bounds) if bounds else (None, "")


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
    num_sequences: int = 1  # num_return_sequences: each sampled on its own, its responses tagged sequence_index
    return_output_ids: bool = False  # each response's new token ids (output_ids), for the vLLM adapter's logprobs


def parse_request(inputs: dict[str, np.ndarray], parameters: dict | None = None,
                  limits: RequestLimits | None = None) -> GenerationRequest:
    """inputs: tensors by name (batch dimension included, batch size 1); parameters: Triton request parameters."""
    parameters = parameters or {}
    limits = limits or RequestLimits()
    prompt_ids = _token_ids(inputs, "input_ids", limits.vocab_size)
    stream = _bool(inputs, "stream", False)
    exclude_input = _bool(inputs, "exclude_input_in_output", False)
    echo = "" if stream or exclude_input else _text(inputs, "text_input")
    _reject_unsupported(inputs)
    _check_ignored(inputs)
    params = _sampling_params(inputs, parameters, limits.vocab_size)
    prompt_field = "text_input" if "text_input" in inputs else "input_ids"
    _check_context(prompt_field, len(prompt_ids), params.max_tokens, limits)
    return GenerationRequest(
        prompt_ids=prompt_ids,
        params=params,
        stream=stream,
        echo_text=echo,
        stop_strings=_stop_strings(inputs, "stop_words"),
        return_log_probs=_bool(inputs, "return_log_probs", False),
        return_num_input_tokens=_bool(inputs, "return_num_input_tokens", False),
        return_num_output_tokens=_bool(inputs, "return_num_output_tokens", False),
        return_perf_metrics=_bool(inputs, "return_perf_metrics", False),
        num_sequences=_num_sequences(inputs),
        return_output_ids=_bool(inputs, "return_output_ids", False),
    )


def _sampling_params(inputs: dict[str, np.ndarray], parameters: dict, vocab_size: int | None) -> SamplingParams:
    end_id = _int(inputs, "end_id", None)
    if end_id is not None and vocab_size is not None and not 0 <= end_id < vocab_size:
        raise InvalidParameterError("end_id", f"must be a token id in [0, {vocab_size}), got {end_id}")
    return SamplingParams(
        max_tokens=_int(inputs, "max_tokens", None, required=True),
        min_tokens=_non_negative(inputs, "min_tokens", alias="min_length"),
        temperature=_float(inputs, "temperature", 0.0),
        top_k=_int(inputs, "top_k", 0),
        top_p=_float(inputs, "top_p", 1.0),
        repetition_penalty=_float(inputs, "repetition_penalty", 1.0),
        presence_penalty=_float(inputs, "presence_penalty", 0.0),
        frequency_penalty=_float(inputs, "frequency_penalty", 0.0),
        seed=_int(inputs, "seed", None, alias="random_seed"),
        end_ids=[end_id] if end_id is not None else [],
        ignore_eos=_parameter_bool(parameters, "ignore_eos", False),
        bad_token_sequences=_word_list(inputs, "bad_words_ids", vocab_size),
        logprobs=_bool(inputs, "return_log_probs", False),
        beam_width=_int(inputs, "beam_width", 1),
    )


def _num_sequences(inputs: dict[str, np.ndarray]) -> int:
    count = _int(inputs, "num_return_sequences", 1)
    if not 1 <= count <= MAX_RETURN_SEQUENCES:
        raise InvalidParameterError("num_return_sequences", f"must be in [1, {MAX_RETURN_SEQUENCES}], got {count}")
    return count


def _check_context(prompt_field: str, num_prompt_tokens: int, max_tokens: int, limits: RequestLimits) -> None:
    """Refused up front rather than cut short at the context's end: the client asked for more than can be."""
    context, what = limits.context()
    if context is None or num_prompt_tokens + max_tokens <= context:
        return
    if num_prompt_tokens >= context:
        raise InvalidParameterError(
            prompt_field, f"the prompt ({num_prompt_tokens} tokens) does not fit the context ({what} {context} tokens)")
    raise InvalidParameterError(
        "max_tokens", f"the prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context "
                      f"({what} {context} tokens); ask for at most {context - num_prompt_tokens}")


def _reject_unsupported(inputs: dict[str, np.ndarray]) -> None:
    for name in UNSUPPORTED_FLAGS:
        if _bool(inputs, name, False):
            raise InvalidParameterError(name, "is not supported by this backend; send false or leave it out")
    words = [w for w in _strings(inputs, "embedding_bias_words") if w]
    weights = inputs.get("embedding_bias_weights")
    if weights is not None and not _is_numeric(np.asarray(weights)):
        raise InvalidParameterError("embedding_bias_weights", f"must be FP32, got {np.asarray(weights).dtype}")
    if words or (weights is not None and np.any(np.asarray(weights) != 0)):
        raise InvalidParameterError("embedding_bias_words", "embedding bias is not supported by this backend")


def _check_ignored(inputs: dict[str, np.ndarray]) -> None:
    _int(inputs, "pad_id", None)
    _float(inputs, "length_penalty", 1.0)


def _value(inputs: dict[str, np.ndarray], name: str, alias: str | None = None):
    """(the name the client used, the single value of a per-request scalar input), or (name, None)."""
    key = name if name in inputs else alias if alias in inputs else None
    if key is None:
        return name, None
    array = np.asarray(inputs[key])
    if array.size != 1:
        raise InvalidParameterError(key, f"expected one value per request (batch size 1), got shape {list(array.shape)}")
    return key, array.reshape(-1)[0]


def _is_numeric(array: np.ndarray) -> bool:
    """Integers and real floats; not bool, complex, bytes or objects."""
    return array.dtype != np.bool_ and (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating))


def _int(inputs, name: str, default, required: bool = False, alias: str | None = None):
    key, value = _value(inputs, name, alias)
    if value is None:
        if required:
            raise InvalidParameterError(name, "is required")
        return default
    dtype = np.asarray(value).dtype
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        raise InvalidParameterError(key, f"must be an integer tensor, got {dtype}")
    return int(value)


def _non_negative(inputs, name: str, alias: str) -> int:
    """An optional count (0 when absent); a negative one is an error naming the input the client sent."""
    key, _ = _value(inputs, name, alias)
    value = _int(inputs, name, 0, alias=alias)
    if value < 0:
        raise InvalidParameterError(key, f"must be >= 0, got {value}")
    return value


def _float(inputs, name: str, default: float) -> float:
    key, value = _value(inputs, name)
    if value is None:
        return default
    if not _is_numeric(np.asarray(value)):
        raise InvalidParameterError(key, f"must be a number, got {np.asarray(value).dtype}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidParameterError(key, f"must be finite, got {number}")
    return number


def _bool(inputs, name: str, default: bool) -> bool:
    """BOOL tensors; an integer 0 or 1 is tolerated (some clients send INT32 flags to the engine model)."""
    key, value = _value(inputs, name)
    if value is None:
        return default
    dtype = np.asarray(value).dtype
    if dtype == np.bool_:
        return bool(value)
    if np.issubdtype(dtype, np.integer) and int(value) in (0, 1):
        return bool(value)
    raise InvalidParameterError(key, f"must be a BOOL (true or false), got {dtype} {value!r}")


def _text(inputs, name: str) -> str:
    _, value = _value(inputs, name)
    return "" if value is None else decode_text(value, name)


def _strings(inputs, name: str) -> list[str]:
    """A list-of-strings input (shape [1, N] or [N])."""
    if name not in inputs:
        return []
    return [decode_text(v, name) for v in np.asarray(inputs[name]).reshape(-1)]


def _stop_strings(inputs, name: str) -> list[str]:
    """Non-empty stop strings (clients send "" for none), bounded in count and length."""
    words = [w for w in _strings(inputs, name) if w]
    if len(words) > MAX_STOP_SEQUENCES:
        raise InvalidParameterError(name, f"at most {MAX_STOP_SEQUENCES} stop words, got {len(words)}")
    longest = max((len(w.encode("utf-8")) for w in words), default=0)
    if longest > MAX_STOP_WORD_BYTES:
        raise InvalidParameterError(name, f"each stop word at most {MAX_STOP_WORD_BYTES} bytes, got {longest}")
    return words


def decode_text(value, name: str) -> str:
    """One element of a BYTES tensor as text; anything but valid UTF-8 bytes is an error naming the input."""
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidParameterError(name, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(value, (str, np.str_)):
        return str(value)
    raise InvalidParameterError(name, f"must be a string (BYTES) tensor, got {type(value).__name__}")


def _token_ids(inputs, name: str, vocab_size: int | None) -> list[int]:
    if name not in inputs:
        raise InvalidParameterError(name, "is required")
    array = np.asarray(inputs[name])
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise InvalidParameterError(name, f"must be an integer tensor, got {array.dtype}")
    if array.ndim == 2 and array.shape[0] != 1 or array.ndim > 2:
        raise InvalidParameterError(name, f"batch size must be 1 per request, got shape {list(array.shape)}")
    ids = [int(t) for t in array.reshape(-1)]
    if not ids:
        raise InvalidParameterError(name, "must not be empty (the prompt has no tokens)")
    _check_token_range(name, ids, vocab_size)
    return ids


def _check_token_range(name: str, ids: list[int], vocab_size: int | None) -> None:
    bad = next((t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
    if bad is not None:
        limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise InvalidParameterError(name, f"token id {bad} is outside the vocabulary {limit}")


def _word_list(inputs, name: str, vocab_size: int | None) -> list[list[int]]:
    """TensorRT-LLM word-list format [batch, 2, L]: row 0 the concatenated ids, row 1 their end offsets
    padded with -1. Offsets must rise and stay within L."""
    if name not in inputs:
        return []
    array = np.asarray(inputs[name])
    shape = list(array.shape)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise InvalidParameterError(name, f"must be an integer tensor, got {array.dtype}")
    if array.ndim == 3 and shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.shape[0] != 2:
        raise InvalidParameterError(name, f"expected shape [1, 2, L], got {shape}")
    ids, ends = [int(t) for t in array[0]], [int(e) for e in array[1] if e >= 0]
    sequences, start = [], 0
    for end in ends:
        if not start <= end <= len(ids):
            raise InvalidParameterError(name, f"end offsets must rise within [0, {len(ids)}], got {end} after {start}")
        if end > start:
            sequences.append(ids[start:end])
        start = end
    for sequence in sequences:
        _check_token_range(name, sequence, vocab_size)
    return sequences


def _parameter_bool(parameters: dict, name: str, default: bool) -> bool:
    value = parse_bool_parameter(parameters, name)
    return default if value is None else value


def parse_bool_parameter(parameters: dict, name: str) -> bool | None:
    """A Triton request parameter as a bool (clients send true, "true" or 1), None when absent."""
    if name not in parameters:
        return None
    value = parameters[name]
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise InvalidParameterError(name, f"must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise InvalidParameterError(name, f"must be true or false, got {value!r}")
