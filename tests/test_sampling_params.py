"""SamplingParams validation: every bad value is an InvalidParameterError that names its field."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.engine.errors import InvalidParameterError
from backend.engine.sampling_params import MAX_SEED, MAX_STOP_SEQUENCES, MAX_SEQUENCE_TOKENS, SamplingParams

NAN, INF = float("nan"), float("inf")

# (kwargs, the field the error must name). Field names are those of the server interface where they differ
# from the attribute: n -> num_return_sequences, stop/bad token sequences -> stop_words / bad_words.
INVALID = [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=3.5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens="16"), "max_tokens"),
    (dict(max_tokens=None), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=17, max_tokens=16), "min_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=NAN), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(temperature=NAN), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=INF), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=1.0), "seed"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=INF), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-NAN), "frequency_penalty"),
    (dict(beam_width=2), "beam_width"),
    (dict(beam_width=True), "beam_width"),
    (dict(n=2), "num_return_sequences"),
    (dict(n=True), "num_return_sequences"),
    (dict(end_ids=[-1]), "end_id"),
    (dict(end_ids=[2.0]), "end_id"),
    (dict(stop_token_sequences=[[]]), "stop_words"),
    (dict(stop_token_sequences=[[1]] * (MAX_STOP_SEQUENCES + 1)), "stop_words"),
    (dict(stop_token_sequences=[[1] * (MAX_SEQUENCE_TOKENS + 1)]), "stop_words"),
    (dict(stop_token_sequences=[[1, -2]]), "stop_words"),
    (dict(bad_token_sequences=[[]]), "bad_words"),
    (dict(bad_token_sequences=[[0]] * (MAX_STOP_SEQUENCES + 1)), "bad_words"),
]


@pytest.mark.parametrize("kwargs, field", INVALID, ids=[f"{f}={list(k.values())[0]!r}"[:40] for k, f in INVALID])
def test_invalid_value_names_its_field(kwargs, field):
    with pytest.raises(InvalidParameterError) as excinfo:
        SamplingParams(**kwargs)
    assert excinfo.value.field == field
    assert str(excinfo.value).startswith(f"{field}: ")


def test_defaults_and_edges_are_valid():
    assert SamplingParams().greedy
    SamplingParams(max_tokens=1, min_tokens=1, top_p=1.0, top_k=0, seed=0)
    SamplingParams(seed=MAX_SEED, top_p=1e-9, temperature=1e-9, repetition_penalty=1e-9,
                   presence_penalty=-2.0, frequency_penalty=2.0, top_k=10**9)
    SamplingParams(stop_token_sequences=[[1] * MAX_SEQUENCE_TOKENS] * MAX_STOP_SEQUENCES)


def test_validate_rechecks_after_mutation():
    params = SamplingParams(temperature=1.0)
    params.temperature = -1.0
    with pytest.raises(InvalidParameterError, match="temperature"):
        params.validate()


# ---------------------------------------------------------------- property tests
token = st.integers(0, 2**31)
sequences = st.lists(st.lists(token, min_size=1, max_size=MAX_SEQUENCE_TOKENS), max_size=8)


@st.composite
def valid_kwargs(draw):
    max_tokens = draw(st.integers(1, 10**6))
    return dict(
        max_tokens=max_tokens,
        min_tokens=draw(st.integers(0, max_tokens)),
        temperature=draw(st.floats(0.0, 1e30)),
        top_k=draw(st.integers(0, 10**9)),
        top_p=draw(st.floats(0.0, 1.0, exclude_min=True)),
        repetition_penalty=draw(st.floats(0.0, 1e30, exclude_min=True)),
        presence_penalty=draw(st.floats(-2.0, 2.0)),
        frequency_penalty=draw(st.floats(-2.0, 2.0)),
        seed=draw(st.none() | st.integers(0, MAX_SEED)),
        end_ids=draw(st.lists(token, max_size=4)),
        ignore_eos=draw(st.booleans()),
        stop_token_sequences=draw(sequences),
        bad_token_sequences=draw(sequences),
        logprobs=draw(st.booleans()),
    )


@settings(max_examples=200, deadline=None)
@given(valid_kwargs())
def test_in_range_values_construct(kwargs):
    SamplingParams(**kwargs).validate()


# Anything at all for the scalar fields: whatever constructs must be in range, and whatever does not
# must fail with InvalidParameterError (never a TypeError or a silent accept).
anything = (st.integers(-(2**65), 2**65) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
            | st.none() | st.text(max_size=3))
SCALARS = ["max_tokens", "min_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
           "presence_penalty", "frequency_penalty", "seed", "beam_width", "n"]


def in_range(p: SamplingParams) -> bool:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    return (is_int(p.max_tokens) and p.max_tokens >= 1 and is_int(p.min_tokens) and 0 <= p.min_tokens <= p.max_tokens
            and math.isfinite(p.temperature) and p.temperature >= 0 and is_int(p.top_k) and p.top_k >= 0
            and 0 < p.top_p <= 1 and math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0
            and -2 <= p.presence_penalty <= 2 and -2 <= p.frequency_penalty <= 2
            and (p.seed is None or (is_int(p.seed) and 0 <= p.seed <= MAX_SEED))
            and is_int(p.beam_width) and p.beam_width == 1 and is_int(p.n) and p.n == 1)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SCALARS), anything, max_size=4))
def test_whatever_constructs_is_in_range(kwargs):
    try:
        params = SamplingParams(**kwargs)
    except InvalidParameterError:
        return
    assert in_range(params), kwargs
    params.validate()


FLOAT_RANGES = {  # field -> predicate of valid values
    "temperature": lambda v: math.isfinite(v) and v >= 0,
    "top_p": lambda v: 0 < v <= 1,
    "repetition_penalty": lambda v: math.isfinite(v) and v > 0,
    "presence_penalty": lambda v: -2 <= v <= 2,
    "frequency_penalty": lambda v: -2 <= v <= 2,
}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(FLOAT_RANGES)), st.floats(allow_nan=True, allow_infinity=True))
def test_random_floats_are_accepted_exactly_inside_their_range(field, value):
    if FLOAT_RANGES[field](value):
        assert getattr(SamplingParams(**{field: value}), field) == value
        return
    with pytest.raises(InvalidParameterError) as excinfo:
        SamplingParams(**{field: value})
    assert excinfo.value.field == field
