"""Sampler tests: every feature against a plain per-row float64 reference written here, plus seeded,
batch-independent randomness. All CPU; one CUDA-vs-CPU check runs only where a GPU is present."""
from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from backend.engine.request import Request
from backend.engine.sampler import Sampler, row_key, uniform_noise
from backend.engine.sampling_params import SamplingParams

SAMPLER = Sampler()


def make_request(prompt=(1, 2, 3), output=(), seed=0, **params) -> Request:
    request = Request("r", list(prompt), SamplingParams(max_tokens=1000, **params), seed=seed)
    request.output_token_ids = list(output)
    return request


# ---------------------------------------------------------------- float64 references, one row at a time
def ref_process(logits: np.ndarray, request: Request) -> np.ndarray:
    x = logits.astype(np.float64).copy()
    p = request.sampling_params
    prompt, output = request.prompt_token_ids, request.output_token_ids
    for t in set(prompt + output):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(output).items():
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    if len(output) < p.min_tokens:
        for t in list(p.end_ids) + [s[-1] for s in p.stop_token_sequences]:
            if t < len(x):
                x[t] = -math.inf
    history = prompt + output
    for s in p.bad_token_sequences:
        k = len(s) - 1
        if k <= len(history) and history[len(history) - k:] == s[:-1] and s[-1] < len(x):
            x[s[-1]] = -math.inf
    return x


def ref_log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


def ref_distribution(x: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Sampling probabilities after temperature, top-k, top-p. Cuts are value thresholds (HF semantics):
    tokens tied with the last kept one are kept as well."""
    z = x / temperature
    values = sorted(z, reverse=True)
    kept = z >= values[top_k - 1] if 0 < top_k < len(z) else np.ones(len(z), bool)
    probs = np.where(kept, np.exp(z - np.max(z)), 0.0)
    probs /= probs.sum()
    mass = 0.0
    for value in sorted(set(z[kept]), reverse=True):  # walk the kept values, ties together
        cutoff = value
        mass += probs[z == value].sum()
        assert top_p == 1.0 or abs(mass - top_p) > 1e-4, "top_p too close to a cumulative mass: ambiguous test"
        if mass >= top_p:
            break
    out = np.where(kept & (z >= cutoff), np.exp(z - np.max(z)), 0.0)
    return out / out.sum()


def ref_uniform(seed: int, position: int, token: int) -> float:
    """splitmix64 written out independently of the sampler module."""
    mask = (1 << 64) - 1

    def mix(z):
        z &= mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = mix(mix(seed) + position * 0x9E3779B97F4A7C15)
    return ((mix(key + (token + 1) * 0x9E3779B97F4A7C15) >> 41) * 2 + 1) / 2**24


def processed(logits: torch.Tensor, requests: list[Request]) -> np.ndarray:
    return SAMPLER.process_logits(logits, requests).double().numpy()


def assert_rows_match(logits: torch.Tensor, requests: list[Request]) -> None:
    got = processed(logits, requests)
    for i, request in enumerate(requests):
        want = ref_process(logits[i].numpy(), request)
        assert np.array_equal(np.isneginf(got[i]), np.isneginf(want)), f"row {i}: -inf masks differ"
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[i][finite], want[finite], rtol=1e-6, atol=1e-5, err_msg=f"row {i}")


# ---------------------------------------------------------------- penalties
@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_numbers(penalty):
    logits = torch.tensor([[2.0, -2.0, 0.5, -0.5, 3.0, 0.0, 1.0, -1.0]])
    request = make_request(prompt=[0, 1, 5], output=[2, 3, 3], repetition_penalty=penalty)
    got = processed(logits, [request])[0]
    want = [2.0 / penalty, -2.0 * penalty, 0.5 / penalty, -0.5 * penalty, 3.0, 0.0, 1.0, -1.0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 6)
    request = make_request(prompt=[0, 0, 1], output=[1, 2, 2, 2], presence_penalty=0.5, frequency_penalty=0.25)
    got = processed(logits, [request])[0]
    np.testing.assert_allclose(got, [0.0, -(0.5 + 0.25), -(0.5 + 0.75), 0.0, 0.0, 0.0], rtol=1e-6)


def test_negative_presence_frequency_reward_repeats():
    request = make_request(output=[4, 4], presence_penalty=-1.0, frequency_penalty=-0.5)
    got = processed(torch.zeros(1, 5), [request])[0]
    np.testing.assert_allclose(got, [0, 0, 0, 0, 2.0], rtol=1e-6)


def random_request(rng: random.Random, vocab: int) -> Request:
    prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
    output = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
    history = prompt + output
    tail = history[-rng.randint(1, min(3, len(history))):]
    bad = [tail + [rng.randrange(vocab)], [rng.randrange(vocab)], [rng.randrange(vocab) for _ in range(3)]]
    return make_request(
        prompt, output, seed=rng.randrange(2**64),
        repetition_penalty=rng.choice([1.0, 0.8, 1.5]),
        presence_penalty=rng.choice([0.0, 0.7, -0.3]),
        frequency_penalty=rng.choice([0.0, 0.4, -1.2]),
        min_tokens=rng.choice([0, 5, 20]),
        end_ids=[rng.randrange(vocab)],
        stop_token_sequences=[[rng.randrange(vocab) for _ in range(rng.randint(1, 3))]],
        bad_token_sequences=rng.sample(bad, rng.randint(0, 3)),
        temperature=rng.choice([0.0, 0.7, 1.0]),
    )


@pytest.mark.parametrize("trial", range(20))
def test_random_batches_match_reference(trial):
    rng = random.Random(trial)
    vocab = rng.choice([7, 33, 100])
    requests = [random_request(rng, vocab) for _ in range(rng.randint(1, 9))]
    logits = torch.randn(len(requests), vocab, generator=torch.Generator().manual_seed(trial)) * 3
    assert_rows_match(logits, requests)


# ---------------------------------------------------------------- min_tokens and bad words
def test_min_tokens_bans_end_ids_and_last_stop_tokens_until_reached():
    params = dict(min_tokens=3, end_ids=[9], stop_token_sequences=[[4, 5], [6]], temperature=0.0)
    logits = torch.zeros(1, 10)
    logits[0, 9] = 10.0  # EOS is the favourite
    for n_out, banned in [(0, True), (2, True), (3, False), (5, False)]:
        request = make_request(output=[1] * n_out, **params)
        got = processed(logits, [request])[0]
        assert all(np.isneginf(got[[9, 5, 6]])) == banned
        assert not np.isneginf(got[4])  # only the last token of a stop sequence
        assert (SAMPLER(logits, [request]).token_ids[0] == 9) != banned


@pytest.mark.parametrize("prompt, output, sequence, banned", [
    ([1, 2, 3], [], [7], True),                  # single token: always banned
    ([1, 2, 3], [], [2, 3, 7], True),            # prefix ends the prompt
    ([1, 2], [3], [2, 3, 7], True),              # prefix spans prompt and output
    ([1, 2], [3, 4], [2, 3, 7], False),          # prefix present but not at the tail
    ([3], [], [2, 3, 7], False),                 # prefix longer than history
    ([2, 3], [], [9, 2, 3, 7], False),           # prefix longer than history, tail agrees
    ([5, 1], [2, 3], [5, 1, 2, 3, 7], True),     # whole history is the prefix
])
def test_bad_word_sequences(prompt, output, sequence, banned):
    request = make_request(prompt, output, bad_token_sequences=[sequence])
    logits = torch.zeros(1, 10)
    logits[0, 7] = 5.0
    got = processed(logits, [request])[0]
    assert np.isneginf(got[7]) == banned
    assert np.isneginf(got).sum() == int(banned)
    assert (SAMPLER(logits, [request]).token_ids[0] == 7) != banned


def test_out_of_vocab_ids_are_ignored():
    request = make_request(min_tokens=1, end_ids=[10**6], bad_token_sequences=[[10**6]], repetition_penalty=2.0)
    request.output_token_ids = []
    logits = torch.randn(1, 10)
    np.testing.assert_allclose(processed(logits, [request])[0], ref_process(logits[0].numpy(), request), rtol=1e-6)


# ---------------------------------------------------------------- greedy, temperature, top-k, top-p
def test_greedy_rows_are_argmax_among_sampled_rows():
    logits = torch.randn(32, 1000, generator=torch.Generator().manual_seed(0))
    requests = [make_request(seed=i, temperature=0.0 if i % 2 else 1.0) for i in range(32)]
    tokens = SAMPLER(logits, requests).token_ids
    for i in range(1, 32, 2):
        assert tokens[i] == int(np.argmax(logits[i].numpy()))


def test_greedy_tie_takes_lowest_id_and_input_is_untouched():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0]])
    before = logits.clone()
    assert SAMPLER(logits, [make_request(repetition_penalty=2.0)]).token_ids == [1]
    assert torch.equal(logits, before)


def test_plain_greedy_argmax_in_bf16_matches_the_float64_reference():
    # all-greedy batches without penalties take the argmax of the bf16 logits (no float32 copy)
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    logits[::2, 5] = logits[::2, 6] = 10.0  # exact ties on even rows: the lower id wins
    favourites = logits.float().argmax(-1).tolist()
    requests = [make_request(output=[1] * i, min_tokens=4, end_ids=[favourites[i]]) for i in range(16)]
    before = logits.clone()
    got = SAMPLER(logits, requests).token_ids
    assert got == np.argmax(processed(logits.float(), requests), axis=-1).tolist()
    assert [got[i] != favourites[i] for i in range(16)] == [i < 4 for i in range(16)]  # EOS banned until 4 out
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [1e-30, 1e-6])
def test_tiny_temperature_is_greedy_without_nan(temperature):
    logits = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    requests = [make_request(seed=i, temperature=temperature, top_p=0.5, logprobs=True) for i in range(50)]
    out = SAMPLER(logits, requests)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert all(math.isfinite(lp) for lp in out.logprobs)


def draw_many(logits_row: torch.Tensor, n: int, **params) -> np.ndarray:
    requests = [make_request(seed=s, **params) for s in range(n)]
    return np.array(SAMPLER(logits_row.expand(n, -1), requests).token_ids)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 5, 1.0), (0.7, 1, 1.0), (1.3, 0, 0.6), (1.0, 0, 0.3), (2.0, 10, 0.8), (1.0, 3, 0.95), (0.5, 10**6, 1.0),
])
def test_top_k_top_p_support(temperature, top_k, top_p):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(7)) * 2
    want = ref_distribution(logits.double().numpy(), temperature, top_k, top_p)
    tokens = draw_many(logits, 2000, temperature=temperature, top_k=top_k, top_p=top_p)
    outside = set(tokens.tolist()) - set(np.flatnonzero(want).tolist())
    assert not outside, f"tokens outside the top-k/top-p support: {outside}"
    # The support is also reached: every kept token of probability >= 2% shows up.
    assert set(np.flatnonzero(want >= 0.02).tolist()) <= set(tokens.tolist())


@pytest.mark.parametrize("top_k, top_p, support", [(2, 1.0, {0, 1, 2, 3}), (1, 1.0, {0}), (0, 0.5, {0, 1, 2, 3}), (0, 0.4, {0})])
def test_ties_at_the_cut_are_kept(top_k, top_p, support):
    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0])
    tokens = set(draw_many(logits, 3000, temperature=1.0, top_k=top_k, top_p=top_p).tolist())
    assert tokens == support


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.75)])
def test_empirical_distribution_matches(temperature, top_k, top_p):
    logits = torch.tensor([1.0, 0.2, -0.5, 0.6])
    want = ref_distribution(logits.double().numpy(), temperature, top_k, top_p)
    n = 4000
    counts = np.bincount(draw_many(logits, n, temperature=temperature, top_k=top_k, top_p=top_p), minlength=4)
    # 4000 draws: standard error <= sqrt(0.25 / 4000) ~ 0.008, so 0.03 is ~4 sigma and a real skew fails.
    np.testing.assert_allclose(counts / n, want, atol=0.03)
    assert counts[want == 0].sum() == 0


def test_noise_is_splitmix64_of_seed_and_position():
    cases = [(0, 0), (5, 7), (2**64 - 1, 123456), (2**63, 2**31)]
    keys = torch.tensor([row_key(s, p) - (1 << 64) if row_key(s, p) >= 1 << 63 else row_key(s, p) for s, p in cases])
    got = uniform_noise(keys, 9)
    for row, (seed, position) in enumerate(cases):
        assert got[row].tolist() == [ref_uniform(seed, position, t) for t in range(9)]
    big = uniform_noise(keys, 5000)
    assert 0.0 < big.min() and big.max() < 1.0 and abs(big.mean().item() - 0.5) < 0.01


# ---------------------------------------------------------------- seeds and batch independence
def step_logits(position: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 + position)) * 1.5


def test_same_token_alone_or_in_any_shuffled_batch():
    vocab, rng = 64, random.Random(3)
    params = dict(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.2, logprobs=True)
    alone, mixed = make_request(seed=2**64 - 5, **params), make_request(seed=2**64 - 5, **params)
    others = [random_request(rng, vocab) for _ in range(7)]
    for position in range(50):
        row = step_logits(position, vocab)
        solo = SAMPLER(row[None], [alone])
        batch = others + [mixed]
        rng.shuffle(batch)
        logits = torch.randn(len(batch), vocab, generator=torch.Generator().manual_seed(position))
        logits[batch.index(mixed)] = row
        out = SAMPLER(logits, batch)
        assert out.token_ids[batch.index(mixed)] == solo.token_ids[0], f"position {position}"
        assert out.logprobs[batch.index(mixed)] == pytest.approx(solo.logprobs[0], abs=1e-6)
        alone.append_output(solo.token_ids[0])
        mixed.append_output(solo.token_ids[0])
        for other, token in zip(batch, out.token_ids):
            if other is not mixed:
                other.output_token_ids.append(token)
    assert len(set(alone.output_token_ids)) > 10  # it really sampled


def generate(seed: int, steps: int = 20, vocab: int = 64) -> list[int]:
    request = make_request(seed=seed, temperature=1.0)
    for position in range(steps):
        request.append_output(SAMPLER(torch.zeros(1, vocab), [request]).token_ids[0])
    return request.output_token_ids


def test_seeds_reproduce_and_differ():
    sequences = [tuple(generate(seed)) for seed in (0, 1, 2, 12345, 2**64 - 1)]
    assert len(set(sequences)) == len(sequences)
    assert tuple(generate(12345)) == sequences[3]
    assert len(set(sequences[0])) > 5  # position changes the draw even with identical logits


# ---------------------------------------------------------------- logprobs
def test_logprobs_are_log_softmax_of_processed_logits_before_temperature():
    rng = random.Random(11)
    vocab = 50
    requests = [random_request(rng, vocab) for _ in range(12)]
    for i, request in enumerate(requests):
        request.sampling_params.logprobs = i % 3 == 0
        request.sampling_params.top_k = 4 if i % 2 else 0
        request.sampling_params.temperature = [0.0, 0.3, 2.0][i % 3]
    logits = torch.randn(len(requests), vocab, generator=torch.Generator().manual_seed(11)) * 4
    out = SAMPLER(logits, requests)
    assert len(out.logprobs) == len(requests)
    for i, request in enumerate(requests):
        want = ref_log_softmax(ref_process(logits[i].numpy(), request))[out.token_ids[i]]
        assert out.logprobs[i] == pytest.approx(want, abs=1e-5)


def test_no_logprobs_when_none_asked():
    out = SAMPLER(torch.randn(3, 10), [make_request(seed=i, temperature=1.0) for i in range(3)])
    assert out.logprobs is None and len(out.token_ids) == 3
    assert all(isinstance(t, int) for t in out.token_ids)


def test_half_precision_logits():
    logits = torch.randn(4, 100).to(torch.bfloat16)
    requests = [make_request(seed=i, temperature=0.0, logprobs=True) for i in range(4)]
    out = SAMPLER(logits, requests)
    assert out.token_ids == logits.float().argmax(-1).tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = random.Random(5)
    requests = [random_request(rng, 1000) for _ in range(64)]
    for request in requests:
        request.sampling_params.top_p, request.sampling_params.top_k = 0.9, 50
        request.sampling_params.logprobs = True
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(5)) * 3
    cpu, gpu = SAMPLER(logits, requests), SAMPLER(logits.cuda(), requests)
    assert cpu.token_ids == gpu.token_ids
    np.testing.assert_allclose(cpu.logprobs, gpu.logprobs, atol=1e-4)
