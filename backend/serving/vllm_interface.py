"""The vLLM backend's interface (INTERFACE.md), translated onto the engine model's: Triton-free, unit-tested.

Clients written for Triton's vLLM backend call one decoupled model without a batch dimension: `text_input` [1],
`stream`, `sampling_parameters` (a JSON object of vLLM SamplingParams whose values may be strings, or the same
object as the request's parameters), `exclude_input_in_output` and `return_*` flags; they read `text_output`,
`finish_reason`, `cumulative_logprob`, `logprobs`, `num_input_tokens` and `num_output_tokens`, one element per
returned sequence. A generated repository's `vllm_model` takes exactly that and forwards each request to the engine
model; this module turns the parameters into the engine model's inputs and folds its responses (one sequence
each) back into vLLM's. Where the client says nothing, vLLM's defaults apply (max_tokens 16, temperature 1.0), as
a vLLM user expects; what this engine cannot do is refused with an error naming the parameter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from backend.engine.errors import InvalidParameterError
from backend.serving.request_parser import parse_bool_parameter

DEFAULT_MAX_TOKENS = 16  # vLLM SamplingParams' default
DEFAULT_TEMPERATURE = 1.0
MAX_PARAMETERS_BYTES = 1 << 16
# vLLM field -> (engine model input, type). vLLM's top_k -1 (or 0) means no cut, as the engine's 0 does.
ENGINE_FIELDS = {
    "max_tokens": ("max_tokens", int), "min_tokens": ("min_tokens", int), "temperature": ("temperature", float),
    "top_p": ("top_p", float), "top_k": ("top_k", int), "seed": ("seed", int),
    "presence_penalty": ("presence_penalty", float), "frequency_penalty": ("frequency_penalty", float),
    "repetition_penalty": ("repetition_penalty", float), "n": ("num_return_sequences", int),
}
# Accepted only at vLLM's default value (what this engine always does); anything else is refused.
DEFAULT_ONLY = {"best_of": (None, 1), "min_p": (0.0,), "use_beam_search": (False,), "prompt_logprobs": (None,),
                "logit_bias": (None,), "length_penalty": (1.0,), "stop_token_ids": (None, ()),
                "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
                "spaces_between_special_tokens": (True,), "detokenize": (True,), "lora_name": (None,),
                "truncate_prompt_tokens": (None,), "guided_decoding": (None,), "structured_outputs": (None,)}
OTHER_FIELDS = ("stop", "ignore_eos", "logprobs")
# Triton's own request parameters and ours, which share the namespace when the parameters come that way
NOT_SAMPLING = ("stream", "apply_chat_template")
RETURN_FLAGS = ("return_finish_reason", "return_cumulative_logprob", "return_logprobs", "return_num_input_tokens",
                "return_num_output_tokens")


@dataclass
class VllmRequest:
    """One vLLM-style request, ready for the engine model: its inputs (batch dimension 1) and parameters."""

    prompt: str
    stream: bool
    prepend_input: bool
    num_sequences: int
    want_logprobs: bool  # sampling_parameters asked for logprobs (else the output is "null", as vLLM sends)
    flags: dict[str, bool]
    engine_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    engine_parameters: dict = field(default_factory=dict)


def parse_vllm_request(prompt: str, stream: bool, exclude_input_in_output: bool | None, sampling_parameters: str | None,
                       request_parameters: str | None, flags: dict[str, bool]) -> VllmRequest:
    """vLLM's rules: the prompt is prepended to a non-streamed answer unless excluded, and a streamed request may
    not ask for it. sampling_parameters wins over the request parameters (vLLM reads one or the other)."""
    prepend = not stream if exclude_input_in_output is None else not exclude_input_in_output
    if prepend and stream:
        raise InvalidParameterError("exclude_input_in_output", "false is not allowed when streaming")
    if sampling_parameters is not None:
        values = _json_object(sampling_parameters, "sampling_parameters")
        source = "sampling_parameters"
    else:
        values = {k: v for k, v in _json_object(request_parameters or "{}", "parameters").items()
                  if k in ENGINE_FIELDS or k in DEFAULT_ONLY or k in OTHER_FIELDS}
        source = "parameters"
    unknown = sorted(k for k in values if k not in ENGINE_FIELDS and k not in DEFAULT_ONLY
                     and k not in OTHER_FIELDS and k not in NOT_SAMPLING)
    if unknown:
        raise InvalidParameterError(source, f"unknown sampling parameter {unknown[0]!r}")
    for key, allowed in DEFAULT_ONLY.items():
        if key in values and _plain(values[key]) not in allowed:
            raise InvalidParameterError(f"{source}.{key}", f"is not supported by this backend; only {allowed[0]!r}")
    settings = {key: _converted(values[key], kind, f"{source}.{key}")
                for key, (_, kind) in ENGINE_FIELDS.items() if key in values and values[key] is not None}
    settings.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    settings.setdefault("temperature", DEFAULT_TEMPERATURE)
    if settings.get("top_k") == -1:
        settings["top_k"] = 0
    logprobs = values.get("logprobs")
    if logprobs is not None and _converted(logprobs, int, f"{source}.logprobs") not in (0, 1):
        raise InvalidParameterError(f"{source}.logprobs", "only the sampled token's log probability is returned "
                                                          "(0 or 1), not alternatives")
    request = VllmRequest(prompt=prompt, stream=stream, prepend_input=prepend,
                          num_sequences=settings.get("n", 1), want_logprobs=logprobs is not None, flags=flags)
    request.engine_inputs = _engine_inputs(prompt, settings, _stop_strings(values.get("stop"), source), request)
    request.engine_parameters = {"apply_chat_template": False}  # vLLM sends the prompt as it is
    if _converted(values.get("ignore_eos", False), bool, f"{source}.ignore_eos"):
        request.engine_parameters["ignore_eos"] = True
    return request


def _engine_inputs(prompt: str, settings: dict, stop: list[str], request: VllmRequest) -> dict[str, np.ndarray]:
    """Always streamed from the engine, prompt excluded: the adapter prepends it itself and builds the
    non-streamed answer from the deltas."""
    needs_logprobs = request.want_logprobs or request.flags.get("return_cumulative_logprob", False)
    inputs = {"text_input": np.array([[prompt.encode("utf-8")]], dtype=np.object_),
              "stream": np.array([[True]]), "exclude_input_in_output": np.array([[True]]),
              "return_num_input_tokens": np.array([[True]]), "return_num_output_tokens": np.array([[True]]),
              "return_log_probs": np.array([[needs_logprobs]]),
              "return_output_ids": np.array([[request.want_logprobs]])}
    for key, value in settings.items():
        name, kind = ENGINE_FIELDS[key]
        dtype = np.uint64 if name == "seed" and value >= 0 else np.int32 if kind is int else np.float32
        inputs[name] = np.array([[value]], dtype=dtype)
    if stop:
        inputs["stop_words"] = np.array([[w.encode("utf-8") for w in stop]], dtype=np.object_)
    return inputs


def _json_object(text: str, name: str) -> dict:
    if len(text) > MAX_PARAMETERS_BYTES:
        raise InvalidParameterError(name, f"at most {MAX_PARAMETERS_BYTES} bytes of JSON, got {len(text)}")
    try:
        value = json.loads(text or "{}")
    except ValueError as exc:
        raise InvalidParameterError(name, f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidParameterError(name, f"must be a JSON object, got {type(value).__name__}")
    return value


def _plain(value):
    """A default-only value as compared: JSON lists as tuples, numeric strings as numbers."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        try:
            return float(lowered)
        except ValueError:
            return value
    return value


def _converted(value, kind, name: str):
    """vLLM's backend converts string values to the field's type; so does this (and checks the result)."""
    if kind is bool:
        return parse_bool_parameter({name: value.strip() if isinstance(value, str) else value}, name)
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        if kind is int:
            number = float(value) if isinstance(value, str) else value
            if not isinstance(number, (int, float)) or number != int(number):
                raise ValueError(value)
            return int(number)
        return float(value)
    except (TypeError, ValueError, OverflowError):
        expected = "an integer" if kind is int else "a number"
        raise InvalidParameterError(name, f"must be {expected}, got {value!r}") from None


def _stop_strings(value, source: str) -> list[str]:
    if value is None:
        return []
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise InvalidParameterError(f"{source}.stop", f"must be a string or a list of strings, got {value!r}")
    return [w for w in words if w]


# ---- responses ------------------------------------------------------------------------------------------------

@dataclass
class SequenceState:
    text: str = ""
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0
    num_output_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)


@dataclass
class EngineDelta:
    """What one engine-model response says about one sequence."""

    sequence: int
    text: str
    finish_reason: str | None
    num_input_tokens: int | None
    num_output_tokens: int | None
    cum_log_prob: float | None
    log_probs: list[float]
    token_ids: list[int]


ENGINE_OUTPUTS = ("text_output", "finish_reason", "cum_log_probs", "output_log_probs", "num_input_tokens",
                  "num_output_tokens", "sequence_index", "output_ids")


def engine_delta(arrays: dict[str, np.ndarray]) -> EngineDelta:
    """One engine-model response (output name -> array, batch dimension 1) as an EngineDelta."""
    def values(name: str) -> list:
        array = arrays.get(name)
        return [] if array is None else np.asarray(array).reshape(-1).tolist()

    def first(name: str):
        found = values(name)
        return found[0] if found else None

    reason = first("finish_reason")
    reason = reason.decode("utf-8") if isinstance(reason, bytes) else reason
    return EngineDelta(sequence=int(first("sequence_index") or 0),
                       text=b"".join(values("text_output")).decode("utf-8"),
                       finish_reason=reason or None,
                       num_input_tokens=first("num_input_tokens"), num_output_tokens=first("num_output_tokens"),
                       cum_log_prob=first("cum_log_probs"), log_probs=[float(x) for x in values("output_log_probs")],
                       token_ids=[int(t) for t in values("output_ids")])


class VllmResponses:
    """Folds the engine model's responses into vLLM's response tensors: with n sequences, every tensor has n
    elements (a streamed response carries one sequence's delta and empty deltas for the others)."""

    def __init__(self, request: VllmRequest, decode_token):
        self.request = request
        self.decode_token = decode_token  # token id -> its text, for the logprobs JSON
        self.sequences = [SequenceState() for _ in range(request.num_sequences)]
        self.num_input_tokens = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    def add(self, delta: EngineDelta) -> dict[str, np.ndarray] | None:
        """Folds one engine response in; returns the streamed response to send (None when not streaming)."""
        if not 0 <= delta.sequence < len(self.sequences):
            raise ValueError(f"the engine answered sequence {delta.sequence} of {len(self.sequences)}")
        state = self.sequences[delta.sequence]
        self.num_input_tokens = delta.num_input_tokens or self.num_input_tokens
        new_tokens = (delta.num_output_tokens or state.num_output_tokens) - state.num_output_tokens
        new_logprobs = [{str(t): {"logprob": lp, "rank": None, "decoded_token": self.decode_token(t)}}
                        for t, lp in zip(delta.token_ids, delta.log_probs)]
        state.text += delta.text
        state.finish_reason = delta.finish_reason or state.finish_reason
        state.cumulative_logprob = delta.cum_log_prob if delta.cum_log_prob is not None else state.cumulative_logprob
        state.num_output_tokens += new_tokens
        state.logprobs += new_logprobs
        if not self.request.stream:
            return None
        texts, counts, logprobs = [""] * len(self.sequences), [0] * len(self.sequences), [[]] * len(self.sequences)
        texts[delta.sequence], counts[delta.sequence], logprobs[delta.sequence] = delta.text, new_tokens, new_logprobs
        return self._tensors(texts, counts, logprobs)

    def whole(self) -> dict[str, np.ndarray]:
        """The one response of a non-streamed request: every sequence's whole text (after the prompt, unless
        excluded), counts and log probabilities."""
        prefix = self.request.prompt if self.request.prepend_input else ""
        return self._tensors([prefix + s.text for s in self.sequences], [s.num_output_tokens for s in self.sequences],
                             [s.logprobs for s in self.sequences])

    def _tensors(self, texts: list[str], counts: list[int], logprobs: list[list[dict]]) -> dict[str, np.ndarray]:
        flags = self.request.flags
        out = {"text_output": np.array([t.encode("utf-8") for t in texts], dtype=np.object_)}
        if flags.get("return_finish_reason"):
            out["finish_reason"] = np.array([str(s.finish_reason).encode() for s in self.sequences], dtype=np.object_)
        if flags.get("return_cumulative_logprob"):
            out["cumulative_logprob"] = np.array([s.cumulative_logprob for s in self.sequences], dtype=np.float32)
        if flags.get("return_logprobs"):
            out["logprobs"] = np.array([(json.dumps(lp) if self.request.want_logprobs else "null").encode()
                                        for lp in logprobs], dtype=np.object_)
        if flags.get("return_num_input_tokens"):
            out["num_input_tokens"] = np.array([self.num_input_tokens], dtype=np.uint32)
        if flags.get("return_num_output_tokens"):
            out["num_output_tokens"] = np.array(counts, dtype=np.uint32)
        return out
