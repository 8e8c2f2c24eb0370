"""Per-request sampling over a batch of logits rows, batched in torch and free of host syncs until the end.

Order of operations per row (each a no-op for rows that don't use it, and skipped when no row does):
  1. repetition penalty (HF/CTRL) over prompt + output tokens,
  2. presence / frequency penalties (OpenAI) over output tokens,
  3. min_tokens: end ids and the last token of each stop sequence get -inf while output < min_tokens,
  4. bad-word sequences: ban a sequence's last token when the rest of it ends the token history,
  5. greedy rows take the argmax; other rows apply temperature, top-k, top-p, then draw.

Randomness is counter-based: the draw for (seed, output position) is a pure function of those two numbers,
so a request yields the same tokens whatever else is in the batch, in any order, on CPU or GPU alike.
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import torch

from .outputs import SampledTokens
from .request import Request

_MASK64 = (1 << 64) - 1
# splitmix64 constants (Steele, Lea & Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014).
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_UNIFORM_BITS = 23  # (2b + 1) / 2**24 with b < 2**23 is exact in float32 and lies strictly inside (0, 1)


def _signed64(z: int) -> int:
    """The int64 holding the same 64 bits as unsigned z: torch has no usable uint64 arithmetic."""
    return z - (1 << 64) if z >= 1 << 63 else z


def mix64(z: int) -> int:
    """splitmix64's finalizer on a Python int: a bijection of 64-bit values with good avalanche."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def row_key(seed: int, position: int) -> int:
    """The 64-bit key of one draw; token t of the vocabulary then gets mix64(key + (t + 1) * GAMMA)."""
    return mix64(mix64(seed) + position * _GAMMA)


def _srl(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on signed values)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64 on CPU and CUDA, so the bits match uint64 splitmix64.
    z = (z ^ _srl(z, 30)) * _signed64(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed64(_MIX2)
    return z ^ _srl(z, 31)


def uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] float32 uniforms in (0, 1) from int64 row keys [R]; a counter-based generator (the idea of
    Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011, with splitmix64 as the mixer)."""
    counters = torch.arange(1, vocab_size + 1, device=keys.device, dtype=torch.int64) * _signed64(_GAMMA)
    bits = _srl(_mix64_tensor(keys[:, None] + counters[None, :]), 64 - _UNIFORM_BITS)
    return (bits * 2 + 1).to(torch.float32) * 2.0 ** -(_UNIFORM_BITS + 1)


class Sampler:
    """`sampler(logits [N, V], requests) -> SampledTokens`; row i of logits belongs to requests[i].

    `output_positions[i]` is the index among request i's outputs of the token being drawn (default: its
    number of outputs so far). The scheduler passes it explicitly because with async scheduling a request's
    previous token may still be on its way to the host when this one is drawn.
    """

    def __init__(self):
        self.triton_argmax = False  # set by warm_up, once the kernel is compiled for this engine's logits

    def warm_up(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Compiles the Triton argmax for [N, vocab_size] logits (the model's dtype on the plain greedy path,
        float32 after process_logits) and uses it from now on. Nothing to do off CUDA or when interpreted."""
        if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return
        from backend.kernels.argmax import warm_up

        warm_up(vocab_size, (dtype,) if dtype == torch.float32 else (dtype, torch.float32), device)
        self.triton_argmax = True

    def greedy_argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x.argmax(dim=-1), the same ids; the Triton kernel on CUDA once warmed up (torch's took ~28 us for one
        128k row on an H100: backend/kernels/argmax.py)."""
        if self.triton_argmax and x.is_cuda:
            from backend.kernels.argmax import argmax_triton

            return argmax_triton(x)
        return x.argmax(dim=-1)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 output_positions: list[int] | None = None) -> SampledTokens:
        tokens, logprobs = self.sample(logits, requests, output_positions)
        if logprobs is None:
            return SampledTokens(tokens.cpu().tolist())
        return to_host(tokens, logprobs)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, requests: list[Request],
               output_positions: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids [N] (int64) and, if any request asks, their logprobs [N], left on the device."""
        if output_positions is None:
            output_positions = [r.num_output_tokens for r in requests]
        if _plain_greedy(requests):
            # argmax needs no float32: bf16 -> float32 is exact, so the same row wins. This skips a float32
            # copy of every logit (at batch 256 x 128k vocab, ~100 us of a ~12 ms step).
            bans = _ban_pairs(requests, output_positions, logits.shape[1])
            return self.greedy_argmax(_set_banned(logits.clone(), bans) if bans else logits), None
        processed = self.process_logits(logits, requests, output_positions)
        tokens = self._choose(processed, requests, output_positions)
        if not any(r.sampling_params.logprobs for r in requests):
            return tokens, None
        # Logprobs are those of the model's distribution after penalties and bans, *before* temperature,
        # top-k and top-p: they score the token under the model (as OpenAI and vLLM's default report),
        # not under the sampling distribution, which would give -inf-free but decoding-dependent numbers.
        return tokens, torch.log_softmax(processed, dim=-1).gather(1, tokens[:, None]).squeeze(1)

    def process_logits(self, logits: torch.Tensor, requests: list[Request],
                       output_positions: list[int] | None = None) -> torch.Tensor:
        """Steps 1-4 on a float32 copy (the caller's tensor is left alone)."""
        if output_positions is None:
            output_positions = [r.num_output_tokens for r in requests]
        x = logits.to(torch.float32, copy=True)
        x = _apply_repetition_penalty(x, requests)
        x = _apply_presence_frequency(x, requests)
        return _apply_bans(x, requests, output_positions)

    def _choose(self, x: torch.Tensor, requests: list[Request], output_positions: list[int]) -> torch.Tensor:
        tokens = self.greedy_argmax(x)  # greedy rows; argmax takes the first of equal maxima
        rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if not rows:
            return tokens
        if len(rows) == len(requests):
            return _sample(x, requests, output_positions)
        index = _device_tensor(rows, torch.int64, x.device)
        sampled = _sample(x.index_select(0, index), [requests[i] for i in rows], [output_positions[i] for i in rows])
        return tokens.index_copy(0, index, sampled)


def _plain_greedy(requests: list[Request]) -> bool:
    """Every row greedy, without penalties or logprobs: the argmax of the (banned) logits is the whole job."""
    return all(p.greedy and not p.logprobs and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
               and p.frequency_penalty == 0.0 for p in (r.sampling_params for r in requests))


def to_host(tokens: torch.Tensor, logprobs: torch.Tensor) -> SampledTokens:
    """One device-to-host transfer for both: token ids < 2**53 are exact in float64."""
    return _unpack(torch.stack([tokens.to(torch.float64), logprobs.to(torch.float64)]).cpu(), True)


def _unpack(host: torch.Tensor, has_logprobs: bool) -> SampledTokens:
    if has_logprobs:
        return SampledTokens(host[0].to(torch.int64).tolist(), host[1].tolist())
    return SampledTokens(host.tolist())


class PendingTokens:
    """A step's sampled ids (and logprobs) on their way to the host, for async scheduling.

    The copy into pinned memory is enqueued behind the step's kernels and an event marks its end, so
    result() waits for this step alone, not for the next step that the host enqueues meanwhile (a plain
    .cpu() would wait for the whole stream and serialize host and GPU again).
    """

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor | None):
        self._has_logprobs = logprobs is not None
        packed = torch.stack([tokens.to(torch.float64), logprobs.to(torch.float64)]) if self._has_logprobs else tokens
        self._event = None
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed

    def result(self) -> SampledTokens:
        if self._event is not None:
            self._event.synchronize()
        return _unpack(self._host, self._has_logprobs)


def _device_tensor(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list or CPU tensor -> device tensor without a stream sync (pinned staging on CUDA)."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _column(values: list[float], x: torch.Tensor) -> torch.Tensor:
    return _device_tensor(values, x.dtype, x.device)[:, None]


def _token_counts(x: torch.Tensor, rows: list[int], token_lists: list[list[int]]) -> torch.Tensor:
    """[N, V] float32 occurrence counts of token_lists[j] in row rows[j]. Ids outside [0, V) land in a
    spare column that is dropped, so a stray id can never raise a device-side assert mid-batch."""
    num_rows, vocab = x.shape
    lengths = [len(tokens) for tokens in token_lists]
    total = sum(lengths)
    # np.fromiter is ~10x faster than torch.tensor(list) here: 300k ids took 7 ms instead of 68 ms.
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total)
    token_ids = _device_tensor(torch.from_numpy(flat), torch.int64, x.device)
    token_ids = torch.where((token_ids >= 0) & (token_ids < vocab), token_ids, vocab)
    row_ids = torch.repeat_interleave(_device_tensor(rows, torch.int64, x.device),
                                      _device_tensor(lengths, torch.int64, x.device), output_size=total)
    counts = torch.zeros(num_rows, vocab + 1, dtype=torch.float32, device=x.device)
    ones = torch.ones(total, dtype=torch.float32, device=x.device)
    counts.index_put_((row_ids, token_ids), ones, accumulate=True)
    return counts[:, :vocab]


def _apply_repetition_penalty(x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    # Host cost is O(prompt + output) per step for penalized rows only; a persistent per-request
    # token mask on the device would remove it if penalties become common.
    rows = [i for i, r in enumerate(requests) if r.sampling_params.repetition_penalty != 1.0]
    if not rows:
        return x
    seen = _token_counts(x, rows, [requests[i].all_token_ids for i in rows]) > 0
    penalty = _column([r.sampling_params.repetition_penalty for r in requests], x)
    return torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)


def _apply_presence_frequency(x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    rows = [i for i, r in enumerate(requests)
            if r.sampling_params.presence_penalty != 0.0 or r.sampling_params.frequency_penalty != 0.0]
    if not rows:
        return x
    counts = _token_counts(x, rows, [requests[i].output_token_ids for i in rows])
    presence = _column([r.sampling_params.presence_penalty for r in requests], x)
    frequency = _column([r.sampling_params.frequency_penalty for r in requests], x)
    return x - presence * (counts > 0) - frequency * counts


def banned_tokens(request: Request, output_position: int | None = None) -> list[int]:
    """Tokens that get -inf for this request's draw of output `output_position` (default: the next one):
    min_tokens and bad words. Bad words read the token history, so they need every earlier token known."""
    params = request.sampling_params
    banned: list[int] = []
    if output_position is None:
        output_position = request.num_output_tokens
    if output_position < params.min_tokens:
        # End ids are banned even with ignore_eos: they would not stop the request then, but a request
        # that asked for min_tokens wants that many real tokens, and banning is harmless either way.
        banned += params.end_ids
        banned += [sequence[-1] for sequence in params.stop_token_sequences]
    n = request.num_tokens
    for sequence in params.bad_token_sequences:
        k = len(sequence) - 1  # k == 0: a single-token bad word matches the empty tail, always banned
        if k <= n and request.token_slice(n - k, n) == sequence[:-1]:
            banned.append(sequence[-1])
    return banned


def _ban_pairs(requests: list[Request], output_positions: list[int], vocab: int) -> list[tuple[int, int]]:
    """(row, token) for every banned token of every row."""
    return [(i, t) for i, (r, position) in enumerate(zip(requests, output_positions))
            for t in banned_tokens(r, position) if 0 <= t < vocab]


def _apply_bans(x: torch.Tensor, requests: list[Request], output_positions: list[int]) -> torch.Tensor:
    pairs = _ban_pairs(requests, output_positions, x.shape[1])
    return _set_banned(x, pairs) if pairs else x


def _set_banned(x: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    rows, tokens = zip(*pairs)
    index = (_device_tensor(list(rows), torch.int64, x.device), _device_tensor(list(tokens), torch.int64, x.device))
    # torch.full on the device is a fill kernel; torch.tensor(..., device=cuda) would copy from pageable memory,
    # which synchronizes the stream and so would wait for the step still in flight under async scheduling.
    return x.index_put_(index, torch.full((), float("-inf"), dtype=x.dtype, device=x.device))


def _sample(x: torch.Tensor, requests: list[Request], output_positions: list[int]) -> torch.Tensor:
    """Temperature, top-k, top-p, then the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) draws
    token i with probability p_i (equivalent to the Gumbel-max trick, Gumbel 1954 / Maddison et al. 2014;
    gpt-fast and vLLM sample the same way). Scores are taken in log space: log p_i - log E_i."""
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a fully banned row stays -inf, not NaN
    # Subtracting the max first keeps tiny temperatures finite: every score is <= 0 and the best one is 0.
    x = (x - top) / _column([r.sampling_params.temperature for r in requests], x)
    x = _top_k_top_p(x, requests)
    keys = [_signed64(row_key(r.seed, position)) for r, position in zip(requests, output_positions)]
    keys = _device_tensor(keys, torch.int64, x.device)
    exponential = -torch.log(uniform_noise(keys, x.shape[1]))
    return (x - torch.log(exponential)).argmax(dim=-1)


def _top_k_top_p(x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Mask all but the top-k, then all but the nucleus. Both cuts are value thresholds (keep x >= the value
    at the cut, as HF's TopKLogitsWarper does): tokens tied with the last kept one are kept too, so the kept
    set never depends on how a sort or top-k orders ties, which could change with the batch."""
    vocab = x.shape[1]
    top_k = [r.sampling_params.top_k if 0 < r.sampling_params.top_k < vocab else vocab for r in requests]
    top_p = [r.sampling_params.top_p for r in requests]
    if all(k == vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        return x
    # topk of the largest k is far cheaper than a full-vocabulary sort when every row has a top-k.
    if max(top_k) < vocab:
        values = x.topk(max(top_k), dim=-1).values
    else:
        values = x.sort(dim=-1, descending=True).values
    ranks = torch.arange(values.shape[1], device=x.device)
    in_k = ranks < _device_tensor(top_k, torch.int64, x.device)[:, None]
    probs = values.masked_fill(~in_k, float("-inf")).softmax(dim=-1)
    # Keep rank j when the mass strictly before it is < top_p: the smallest prefix reaching top_p.
    # (An exclusive cumsum by shifting, not cumsum - probs, to avoid cancellation.)
    before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=-1)
    p = _column(top_p, x)
    keep = in_k & ((before < p) | (p >= 1.0))  # top_p == 1 keeps all, whatever rounding does to the cumsum
    num_kept = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # a prefix of the ranks; always >= 1 token
    cutoff = values.gather(1, num_kept - 1)
    return x.masked_fill(x < cutoff, float("-inf"))
