"""Batch-1 bf16/fp16 matrix-vector product y = x @ W^T for decode, where cuBLAS falls short of bandwidth.

At one token per step every projection is a GEMV: it reads each weight once and does 2 FLOP per weight, so
its speed is the rate at which it streams W from HBM. The kernel gives each program BLOCK_N output rows and
walks K in BLOCK_K tiles, accumulating elementwise products in fp32 registers and reducing across K once at
the end (one cross-thread reduction per program instead of one per tile). Enough programs (N / BLOCK_N, a
few per SM) keep enough loads in flight to approach copy bandwidth. The tile sizes per (N, K) were picked by
perf/profile_decode.py on an H100 (see perf/RESULTS.md). With gated=True the weight is the MLP's [gate; up]
and the kernel returns SiLU-and-mul of the two products: its epilogue does activation.py's job, one launch fewer.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from backend.kernels._jit import lazy_jit
from backend.kernels import _pdl
from backend.kernels._pdl import pdl_args

# Batch-1 gate_up products apply SiLU-and-mul in their epilogue (TRITIUM_GEMV_SILU=0: a separate kernel).
fuse_silu_and_mul = os.environ.get("TRITIUM_GEMV_SILU", "1") != "0"
# The weight loads' L2 eviction policy: evict-first (quant_matmul.w8_weight_eviction says why) took 83 us off the
# 8B bf16 batch-1 step on an H100 (5.375 -> 5.289 ms; perf/RESULTS.md, session 16); "" is the default policy.
weight_eviction = "evict_first"

try:
    import triton
    import triton.language as tl

    from backend.kernels._pdl import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU installs without triton use the reference
    triton = None


def gemv_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, K] -> [1, N], the reference (fp32 accumulation like the kernel)."""
    return (x.float() @ weight.float().T).to(x.dtype)


if triton is not None:

    @lazy_jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRELOAD: tl.constexpr,
                     GATED: tl.constexpr, EVICTION: tl.constexpr, PDL: tl.constexpr):
        # BLOCK_N weight rows per program. GATED: the weight is [gate; up] (2N rows) and the output N values of
        # silu(gate) * up; the program's rows alternate gate row i, up row i, so each pair meets in its sum.
        r = tl.arange(0, BLOCK_N)
        if GATED:
            out_rows = tl.program_id(0) * (BLOCK_N // 2) + r // 2
            rows = out_rows + (r % 2) * N
        else:
            out_rows = tl.program_id(0) * BLOCK_N + r
            rows = out_rows
        cols = tl.arange(0, BLOCK_K)
        row_ok = out_rows < N
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if PRELOAD:  # the first tile before the wait (_pdl.preload_first_tile says why); BLOCK_K <= K here
            w_first = tl.load(w_ptrs, mask=row_ok[:, None], other=0.0, eviction_policy=EVICTION)
        if PDL:  # see _pdl.py
            gdc_wait()
        if PRELOAD:  # used at once: held through the loop, preloaded registers made every GEMV slower
            acc += w_first.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :]
        for k0 in range(BLOCK_K if PRELOAD else 0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptr + k0 + cols)
                w = tl.load(w_ptrs + k0, mask=row_ok[:, None], other=0.0, eviction_policy=EVICTION)
            else:
                col_ok = k0 + cols < K
                x = tl.load(x_ptr + k0 + cols, mask=col_ok, other=0.0)
                w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                            eviction_policy=EVICTION)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        if PDL:
            gdc_launch_dependents()
        y = tl.sum(acc, axis=1)
        if GATED:  # float32 as activation.py's kernel, without rounding gate and up to the model dtype first
            gate, up = tl.split(tl.reshape(y, [BLOCK_N // 2, 2]))
            y = gate * tl.sigmoid(gate) * up
            out_rows = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + out_rows, y.to(out_ptr.dtype.element_ty), mask=out_rows < N)


def pick_tile(N: int, K: int, gated: bool = False, large_hbm: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps). Best of a 12-tile grid per Llama-3-8B projection on an H100
    (perf/profile_decode.py, 2026-11-21): 8x512/4 warps for qkv, o and gate_up (2.65-3.0 TB/s against
    cuBLAS 2.4-2.75); long rows (down, K=14336) and the LM head (N=128256) prefer 4-row tiles. Few rows over a
    long K (a TP2 rank's qkv shard, 3072 x 4096) take 1024-column tiles and 8 warps: 8.6 -> 7.7 us on an H200,
    the best of 24 tiles timed from HBM (perf/tune_gemv.py, perf/results/h200-tune_gemv.json). The other TP2
    shards were within 0.2 us of their best there, except gate_up, whose best on the H200 (16 x 256, 2 us
    faster at TP1 and TP2) is 2% slower than 8 x 512 on the H100 (perf/results/h100-profile_decode.json).
    gated (gate_up with SiLU-and-mul in the epilogue, gate and up rows alternating): timed in place in the 8B
    batch-1 step (perf/ablate_decode.py gated16=..., perf/results/*-ablate_decode-session10.json), the two
    Hopper parts want different tiles: on an H100, 8 x 1024 / 8 warps (best of 11; 16 x 256 / 4 was 37 us per
    step slower); on an H200, 16 x 256 / 4 (best of 8; 8 x 1024 / 8 was 60 us slower). The H200 is told
    apart by its memory (141 GB of HBM3e, 4.8 TB/s, against the H100's 80 GB)."""
    if gated:
        return (16, 256, 4) if large_hbm else (8, 1024, 8)
    if K >= 8192:
        return 4, 512, 8
    if N >= 65536:
        return 4, 512, 4
    if N < 4096 <= K:
        return 8, 1024, 8
    return 8, 512, 4


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, tile: tuple[int, int, int] | None = None,
                gated: bool = False) -> torch.Tensor:
    """x [1, K] (contiguous), weight [N, K] with unit stride along K -> [1, N] in x's dtype; gated: weight is
    [gate; up] and the result [1, N / 2] is silu(x gate^T) * (x up^T), the SiLU-and-mul of activation.py."""
    N, K = weight.shape
    if x.shape != (1, K) or weight.stride(1) != 1 or (gated and N % 2):
        raise ValueError(f"gemv_triton needs x [1, {K}] and a row-major weight (an even number of rows when gated);"
                         f" got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    block_n, block_k, warps = tile or pick_tile(N, K, gated, gated and x.is_cuda and _large_hbm(x.device.index))
    block_k = min(block_k, triton.next_power_of_2(K))
    n_out = N // 2 if gated else N
    out = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_out, block_n // 2 if gated else block_n),)](
        x.contiguous(), weight, out, n_out, K, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
        PRELOAD=_pdl.preload_first_tile and block_k <= K, GATED=gated, EVICTION=weight_eviction, num_warps=warps,
        **pdl_args(x.device))
    return out


@functools.cache
def _large_hbm(device_index: int) -> bool:
    """More than 100 GiB of device memory: an H200-class part (see pick_tile)."""
    return torch.cuda.get_device_properties(device_index).total_memory > 100 * 2**30


def is_decode_row(x: torch.Tensor) -> bool:
    """One half-precision CUDA row: what the GEMV kernels take (decode at batch 1)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.numel() == x.shape[-1] and triton is not None


def linear_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear that takes the GEMV kernel for a single CUDA row in half precision (decode at batch 1)."""
    if is_decode_row(x):
        y = gemv_triton(x.reshape(1, -1), weight).reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class GemvLinear(torch.nn.Linear):
    """nn.Linear whose single-row half-precision calls take the GEMV kernel; same parameters and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_decode(x, self.weight, self.bias)

    def silu_and_mul_decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """SiLU-and-mul of this [gate; up] projection in the GEMV's epilogue for a decode row (one kernel less
        per layer); None where the GEMV does not apply."""
        return silu_and_mul_row(x, self.bias, lambda row: gemv_triton(row, self.weight, gated=True))


def silu_and_mul_row(x: torch.Tensor, bias: torch.Tensor | None, gated_gemv) -> torch.Tensor | None:
    """The gated GEMV `gated_gemv(row [1, K]) -> [1, N] or None` of a [gate; up] projection on a decode row, shaped
    as x; None where it does not apply (turned off, not a decode row, a bias), so the caller runs the product and
    SiLU-and-mul apart. Shared by GemvLinear and the quantized layers."""
    if not (fuse_silu_and_mul and bias is None and is_decode_row(x)):
        return None
    y = gated_gemv(x.reshape(1, -1))
    return None if y is None else y.reshape(*x.shape[:-1], -1)


def use_gemv_for_decode(model: torch.nn.Module) -> int:
    """Switches every plain nn.Linear of `model` (not quantized replacements) to GemvLinear, and the model's
    logits product if it has a `logits_linear` hook (the LM head, ~7% of an 8B model's bytes); returns how
    many linears it switched."""
    if hasattr(model, "logits_linear"):
        model.logits_linear = linear_decode
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = GemvLinear
            count += 1
    return count
