"""Row argmax of logits for greedy sampling: int64 [N] from [N, V], exactly torch.argmax's answer.

Why: at batch 1 torch.argmax over one [1, 128256] bf16 row took 26-28 us on an H100, for 256 KB that HBM reads
in well under a microsecond: one long row is a poor fit for torch's generic reduce. Here the row is split over
up to _MAX_SPLITS programs, about one per SM (stage 1, one 16-byte load per thread for V <= 128k in bf16), and
a second tiny kernel picks the best of their partial results (stage 2).

Measured on an H100 (CUDA graph replays, bf16, V = 128256): N = 1 3.4 us against torch's 26.4 us; N = 64
11.7 against 27.2 us; N = 256 41.7 against 46.7 us. The cost moves to the host: launched eagerly (as the sampler
is), argmax_triton took 54-75 us of host time per call on that machine's CPU (two Triton launches at ~25 us each),
torch.argmax 14-18 us; the GPU is busy with the step's forward meanwhile, so that time is normally hidden.

Exactness: values are compared through a 32-bit integer key that orders like the floats (see stage 1), with
NaN above +inf and -0.0 equal to +0.0, and equal keys go to the lowest index: the first maximum, the first NaN,
as torch.argmax returns.
"""
from __future__ import annotations

import torch


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)


# ---- Triton kernels -----------------------------------------------------------------------------------------
try:
    import triton.language as tl

    from backend.kernels._pdl import gdc_launch_dependents, gdc_wait
except ImportError:  # triton is optional on CPU: the reference above needs only torch
    tl = None

from backend.kernels._jit import lazy_jit
from backend.kernels._pdl import pdl_args

_BLOCK = 1024  # 4 warps x 8 elements: one 16-byte load per thread in bf16
_MAX_SPLITS = 128  # V = 128256 -> 126 programs a row at batch 1, about one per SM of an H100 (132)
# Below every key, even -inf's: the key of masked-off columns. A constexpr, so that kernels may read it.
_INT32_MIN = tl.constexpr(-(2 ** 31)) if tl is not None else None


@lazy_jit
def _argmax_split_kernel(x_ptr, part_ptr, x_stride, vocab, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                         SPLITS: tl.constexpr, PDL: tl.constexpr):
    # grid (N, SPLITS): program (row, s) scans columns [s * CHUNK, (s + 1) * CHUNK) and writes the best key and
    # its first column to part[row, 0, s] and part[row, 1, s].
    if PDL:  # see _pdl.py: the next kernel may launch now; nothing here is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    best_key = tl.full([BLOCK], _INT32_MIN, tl.int32)
    best_col = tl.zeros([BLOCK], tl.int32)
    for offset in range(0, CHUNK, BLOCK):
        cols = split * CHUNK + offset + tl.arange(0, BLOCK)
        mask = cols < vocab
        v = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)  # exact from 16 bits
        # Order-preserving int key: a float's bits read as int32 order non-negative floats; for negative ones
        # the magnitude bits are flipped so that larger magnitudes sort lower. -0.0 becomes +0.0 first (torch
        # ties them), and every NaN gets the largest key (torch's argmax treats NaN as the maximum).
        v = tl.where(v == 0.0, 0.0, v)
        bits = v.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(v != v, 0x7FFFFFFF, key)
        key = tl.where(mask, key, _INT32_MIN)
        better = key > best_key  # strict: each lane sees its columns in increasing order, so ties keep the first
        best_key = tl.where(better, key, best_key)
        best_col = tl.where(better, cols, best_col)
    top = tl.max(best_key, axis=0)
    first = tl.min(tl.where(best_key == top, best_col, vocab), axis=0)
    tl.store(part_ptr + row * (2 * SPLITS) + split, top)
    tl.store(part_ptr + row * (2 * SPLITS) + SPLITS + split, first)


@lazy_jit
def _argmax_merge_kernel(part_ptr, out_ptr, SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, PDL: tl.constexpr):
    # grid (N,): the best key over a row's splits, and the lowest column among the splits that hold it (the
    # splits cover increasing columns, so that is the row's first maximum).
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, SPLITS_POW2)
    mask = splits < SPLITS
    keys = tl.load(part_ptr + row * (2 * SPLITS) + splits, mask=mask, other=_INT32_MIN)
    cols = tl.load(part_ptr + row * (2 * SPLITS) + SPLITS + splits, mask=mask, other=0)
    top = tl.max(keys, axis=0)
    first = tl.min(tl.where(keys == top, cols, 0x7FFFFFFF), axis=0)
    tl.store(out_ptr + row, first.to(tl.int64))


def split_plan(vocab: int) -> tuple[int, int]:
    """(CHUNK, SPLITS): each of SPLITS programs a row scans CHUNK columns (a multiple of _BLOCK). Depends on V
    alone, so every batch size shares one compiled kernel and a CUDA graph can capture it."""
    blocks = -(-vocab // _BLOCK)
    chunk = -(-blocks // _MAX_SPLITS) * _BLOCK
    return chunk, -(-vocab // chunk)


def argmax_triton(x: torch.Tensor) -> torch.Tensor:
    """Same contract as argmax_ref for a 2-D [N, V] tensor (float32, float16 or bfloat16; any row stride).

    Specializations: V (the plan and V % 16), the dtype, the row stride (% 16) and the data pointer (16-byte
    alignment). N is only a grid size: one compile serves every batch size (warm_up below)."""
    import triton

    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"argmax_triton takes [N, V] with V > 0, got {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # float32 keys would round float64
        raise ValueError(f"argmax_triton takes float32, float16 or bfloat16, got {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    n, vocab = x.shape
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    chunk, splits = split_plan(vocab)
    parts = torch.empty(n, 2, splits, dtype=torch.int32, device=x.device)  # [row, (key, column), split]
    pdl = pdl_args(x.device)
    _argmax_split_kernel[(n, splits)](x, parts, x.stride(0), vocab, CHUNK=chunk, BLOCK=_BLOCK, SPLITS=splits,
                                      num_warps=4, **pdl)
    _argmax_merge_kernel[(n,)](parts, out, SPLITS=splits, SPLITS_POW2=triton.next_power_of_2(splits),
                               num_warps=1, **pdl)
    return out


def warm_up(vocab_size: int, dtypes: tuple[torch.dtype, ...], device: torch.device) -> None:
    """Compiles every specialization that [N, vocab_size] logits of these dtypes can hit. Row strides of both
    classes (% 16 == 0 or not) are covered: a tensor-parallel gather leaves the logits as a [:, :V] slice of
    rows padded to a multiple of the rank count. Data pointers of torch allocations are 16-byte aligned."""
    other_stride = vocab_size + 1 if vocab_size % 16 == 0 else -(-vocab_size // 16) * 16
    for dtype in dtypes:
        for width in (vocab_size, other_stride):
            argmax_triton(torch.zeros(2, width, dtype=dtype, device=device)[:, :vocab_size])
