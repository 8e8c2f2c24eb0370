"""argmax_triton against torch.argmax, always exactly (the sampler's greedy ids must not change): the Triton
interpreter on CPU, the compiled kernels and the sampler's greedy path on CUDA."""
import pytest
import torch

from backend.engine.request import Request
from backend.engine.sampler import Sampler
from backend.engine.sampling_params import SamplingParams
from backend.kernels import argmax as argmax_module
from backend.kernels.argmax import argmax_ref, argmax_triton, split_plan

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if ON_GPU else [torch.float32, torch.float16]
INF, NAN = float("inf"), float("nan")


def check(x: torch.Tensor) -> None:
    got = argmax_triton(x)
    assert got.dtype == torch.int64 and got.device == x.device
    assert torch.equal(got, argmax_ref(x)), (got, argmax_ref(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 5000])
def test_random_rows(vocab, n, dtype, device):
    check(torch.randn(n, vocab, device=device).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_first_maximum(dtype, device):
    x = torch.randn(3, 5000, device=device).to(dtype)
    x[0, [10, 11, 4999]] = 9.0  # two in one program's block, one in the last split
    x[1, [1500, 3000, 4000]] = 9.0  # the first is not in the first split
    x[2] = 1.0  # every column ties
    check(x)
    assert argmax_triton(x).tolist() == [10, 1500, 0]


def test_ties_within_one_lane_of_a_looping_program(device):
    # V > _MAX_SPLITS * _BLOCK: each program loops over several blocks, and a lane meets column c, then c + BLOCK
    vocab = 140_000
    chunk, splits = split_plan(vocab)
    assert chunk > argmax_module._BLOCK and splits <= argmax_module._MAX_SPLITS
    x = torch.zeros(2, vocab, device=device)
    x[0, [5 + argmax_module._BLOCK, 5, vocab - 1]] = 3.0
    x[1, vocab - 1] = 3.0  # the maximum in the last, partly masked block
    check(x)
    assert argmax_triton(x).tolist() == [5, vocab - 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype, device):
    rows = [[-INF] * 6,  # all -inf: the first
            [-3.0, -2.0, -1.0, -5.0, -2.0, -1.5],  # all negative: the order of negative keys
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # the last column
            [-0.0, 0.0, -1.0, -0.0, 0.0, -INF],  # -0.0 and +0.0 tie, as in torch
            [1.0, NAN, INF, NAN, 2.0, 3.0],  # NaN counts as the maximum: the first NaN
            [-NAN, INF, 1.0, 0.0, 0.0, 0.0],  # a NaN with its sign bit set too
            [INF, -INF, INF, 0.0, 65504.0, 1.0]]
    x = torch.tensor(rows, device=device).to(dtype)
    check(x)
    assert argmax_triton(x).tolist() == [0, 2, 5, 0, 1, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(dtype, device):
    wide = torch.randn(4, 5003, device=device).to(dtype)
    check(wide[:, 1:5001])  # a slice: row stride 5003, offset data pointer
    check(wide[::2, :1000])  # every other row
    check(wide[:, :700].t())  # non-unit column stride: made contiguous first


def test_empty_and_bad_shapes(device):
    assert argmax_triton(torch.randn(0, 10, device=device)).shape == (0,)
    with pytest.raises(ValueError, match="V > 0"):
        argmax_triton(torch.randn(3, 0, device=device))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        argmax_triton(torch.randn(10, device=device))
    with pytest.raises(ValueError, match="float64"):
        argmax_triton(torch.randn(2, 10, dtype=torch.float64, device=device))


@pytest.mark.parametrize("vocab,chunk,splits", [(1, 1024, 1), (1024, 1024, 1), (1025, 1024, 2),
                                                 (128256, 1024, 126), (152064, 2048, 75), (256000, 2048, 125)])
def test_split_plan(vocab, chunk, splits):
    assert split_plan(vocab) == (chunk, splits)


def test_sampler_stays_on_torch_off_cuda():
    sampler = Sampler()
    sampler.warm_up(1000, torch.float32, torch.device("cpu"))
    assert not sampler.triton_argmax


# ---- CUDA only ----------------------------------------------------------------------------------------------
LLAMA3_VOCAB = 128256
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("n", [1, 7, 64, 256])
def test_llama3_vocab_bf16(n):
    x = torch.randn(n, LLAMA3_VOCAB, device="cuda").to(torch.bfloat16)  # bf16 steps of 1/32 near 4: many ties
    check(x)
    check(x * 0.001)  # more ties still


def _compiled() -> int:
    kernels = (argmax_module._argmax_split_kernel.kernel, argmax_module._argmax_merge_kernel.kernel)
    return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())


def _request(i: int, **params) -> Request:
    return Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=100, **params), seed=i)


@needs_cuda
def test_sampler_warm_up_covers_every_batch_size_and_the_greedy_path(monkeypatch):
    sampler = Sampler()
    sampler.warm_up(LLAMA3_VOCAB, torch.bfloat16, torch.device("cuda"))
    assert sampler.triton_argmax
    compiled = _compiled()
    calls = []
    monkeypatch.setattr(argmax_module, "argmax_triton", lambda x: calls.append(x.shape) or argmax_triton(x))
    for n in (1, 2, 3, 17, 64, 256):
        wide = torch.randn(n, LLAMA3_VOCAB + 6, device="cuda").to(torch.bfloat16)  # a padded TP gather's stride
        for logits in (wide[:, :LLAMA3_VOCAB], wide[:, :LLAMA3_VOCAB].contiguous()):
            plain = [_request(i, temperature=0.0, min_tokens=2, end_ids=[7]) for i in range(n)]  # bans token 7
            tokens, _ = sampler.sample(logits, plain)
            assert torch.equal(tokens, logits.float().index_fill(1, torch.tensor([7], device="cuda"), -INF).argmax(-1))
            mixed = [_request(i, temperature=0.0 if i % 2 else 1.0, logprobs=True) for i in range(n)]  # float32
            tokens, _ = sampler.sample(logits, mixed)
            assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
    assert len(calls) == 24
    assert _compiled() == compiled  # nothing compiled after warm-up
