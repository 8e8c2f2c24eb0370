"""Per-request sampling parameters, validated on construction so that bad input never reaches the GPU."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidParameterError

MAX_SEED = 2**64 - 1
MAX_STOP_SEQUENCES = 64
MAX_SEQUENCE_TOKENS = 128


@dataclass
class SamplingParams:
    """What to sample and when to stop. Defaults are greedy decoding of up to 16 tokens.

    temperature == 0 means greedy. top_k == 0 means no top-k cut. seed None means the engine draws one,
    so every request is reproducible from (seed, position) whatever else is in the batch.
    Stop and bad-word sequences are token-id sequences here; text stop strings are handled by the
    detokenizing layer above the engine (the server), which knows the tokenizer.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    end_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop_token_sequences: list[list[int]] = field(default_factory=list)
    bad_token_sequences: list[list[int]] = field(default_factory=list)
    logprobs: bool = False
    beam_width: int = 1
    n: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_token_history(self) -> bool:
        """Penalties and bad words read every earlier token on the host at each draw, so async scheduling
        (whose latest token is still on the device when the next draw is set up) cannot serve them."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.bad_token_sequences))

    def validate(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise InvalidParameterError("min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check_float("temperature", self.temperature, low=0.0)
        _check_int("top_k", self.top_k, low=0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p <= 0.0:
            raise InvalidParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0)
        if self.repetition_penalty <= 0.0:
            raise InvalidParameterError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED)
        for token in self.end_ids:
            _check_int("end_id", token, low=0)
        _check_sequences("stop_words", self.stop_token_sequences)
        _check_sequences("bad_words", self.bad_token_sequences)
        _check_int("beam_width", self.beam_width)  # True and 1.0 compare equal to 1
        if self.beam_width != 1:
            raise InvalidParameterError("beam_width", f"beam search is not supported; must be 1, got {self.beam_width}")
        _check_int("num_return_sequences", self.n)
        if self.n != 1:
            raise InvalidParameterError("num_return_sequences", f"only 1 is supported, got {self.n}")


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(name, f"must be an integer, got {value!r}")
    if low is not None and value < low:
        raise InvalidParameterError(name, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidParameterError(name, f"must be <= {high}, got {value}")


def _check_float(name: str, value, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidParameterError(name, f"must be finite, got {value}")
    if low is not None and value < low:
        raise InvalidParameterError(name, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidParameterError(name, f"must be <= {high}, got {value}")


def _check_sequences(name: str, sequences: list[list[int]]) -> None:
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise InvalidParameterError(name, f"at most {MAX_STOP_SEQUENCES} sequences, got {len(sequences)}")
    for sequence in sequences:
        if not sequence:
            raise InvalidParameterError(name, "sequences must not be empty")
        if len(sequence) > MAX_SEQUENCE_TOKENS:
            raise InvalidParameterError(name, f"at most {MAX_SEQUENCE_TOKENS} tokens per sequence, got {len(sequence)}")
        for token in sequence:
            _check_int(name, token, low=0)
