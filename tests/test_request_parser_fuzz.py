"""Property-based fuzz of the request parser (hypothesis): whatever tensors arrive, parse_request either returns
a request whose sampling parameters validate, or raises InvalidParameterError (a ValueError) whose message
begins with the name of an input or parameter. Never another exception: that would be a 500 with no field."""
from __future__ import annotations

import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.engine.errors import InvalidParameterError
from backend.serving.request_parser import GenerationRequest, RequestLimits, parse_request

INPUT_NAMES = ["input_ids", "max_tokens", "min_tokens", "min_length", "temperature", "top_k", "top_p", "seed",
               "random_seed", "end_id", "pad_id", "beam_width", "num_return_sequences", "length_penalty",
               "repetition_penalty", "presence_penalty", "frequency_penalty", "stream", "exclude_input_in_output",
               "return_log_probs", "return_context_logits", "return_generation_logits", "return_perf_metrics",
               "return_num_input_tokens", "return_num_output_tokens", "text_input", "stop_words", "bad_words_ids",
               "embedding_bias_words", "embedding_bias_weights"]
PARAMETER_NAMES = ["ignore_eos", "apply_chat_template"]
DTYPES = [np.int32, np.int64, np.uint64, np.float32, np.float64, np.bool_, np.int8, np.complex64, np.object_]
LIMITS = RequestLimits(max_model_len=64, vocab_size=1000, kv_cache_tokens=48)

scalars = st.one_of(st.integers(-3, 200), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.binary(max_size=8), st.text(max_size=8))


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    # Mostly one value per request, the shape clients send, so that values (not only shapes) get exercised.
    shape = draw(st.one_of(st.just([1, 1]), st.just([1, 1]), st.just([1]), st.lists(st.integers(0, 3), max_size=3)))
    values = draw(st.lists(scalars, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    try:
        with warnings.catch_warnings():  # out-of-range ints wrap (what a client's own cast would send)
            warnings.simplefilter("ignore")
            return np.array(values, dtype=dtype).reshape(shape)
    except (ValueError, TypeError, OverflowError):  # values this dtype cannot hold: send them as objects
        return np.array(values + [None], dtype=object)[:-1].reshape(shape)


def good_inputs() -> dict:
    return {"input_ids": np.array([[1, 2, 3]], dtype=np.int32), "max_tokens": np.array([[4]], dtype=np.int32)}


requests = st.fixed_dictionaries({}, optional={name: tensors() for name in INPUT_NAMES})
parameters = st.dictionaries(st.sampled_from(PARAMETER_NAMES + ["other"]), scalars, max_size=3)


def check(inputs: dict, params: dict) -> None:
    try:
        parsed = parse_request(inputs, params, LIMITS)
    except InvalidParameterError as exc:
        assert exc.field in INPUT_NAMES + PARAMETER_NAMES, exc
        assert str(exc).startswith(exc.field + ": ")
        return
    assert isinstance(parsed, GenerationRequest)
    parsed.params.validate()
    assert len(parsed.prompt_ids) + parsed.params.max_tokens <= 48
    assert all(0 <= t < 1000 for t in parsed.prompt_ids)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, parameters)
def test_arbitrary_tensors_parse_or_name_the_field(inputs, params):
    check(inputs, params)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(INPUT_NAMES), tensors(), parameters)
def test_one_arbitrary_tensor_in_an_otherwise_good_request(name, tensor, params):
    """Most fuzzed requests fail on their first bad input; this reaches every input's own checks."""
    check({**good_inputs(), name: tensor}, params)
