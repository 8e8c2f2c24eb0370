"""Tensor-parallel decode: the all-reduce of a row-parallel layer's partial sums, fused with the residual add and
the RMSNorm that follow it, in one kernel per step and sublayer.

Why: at batch 1 a TP2 step of the 8B shape spent 458 us in 65 all-reduces (7 us each, PyTorch's symmetric-memory
one-shot with a barrier before and after) and 137 us in the RMSNorms right after them (perf/RESULTS.md, issue 6).
Here each rank pushes its partial row straight into every rank's buffer over NVLink and polls its own buffer
until every rank's row has landed, with no barrier: a slot holds the "empty" bit pattern (-0.0) until written,
and a real -0.0 is sent as +0.0, so a row is complete when no element is -0.0 any more. This is the Lamport-style
one-shot all-reduce that TensorRT-LLM fuses with its RMSNorm for small messages; the kernel here is our own.

Buffers (each rank's, mapped by every rank through symmetric memory): [3 slots, world, MAX_ROWS, row stride] of
16-bit words. Row r's n-th call uses slot n % 3 (each rank counts its calls per row in `epochs`, and every rank
makes the same calls) and re-marks slot (n + 2) % 3 empty: that slot was read in call n - 1, and no rank can
write it again before call n + 2, which needs this rank's push of call n + 1. The ranks sum in rank order, so
every rank gets the same bits. A rank whose peer never pushes (a dead or stuck worker) waits timeout_s (the
group's collective timeout, after which NCCL's watchdog would give up too), then traps: the kernel never returns
a wrong row, and a trapped context fails every later CUDA call of the process loudly. (A dead worker has normally
failed the engine long before, through the driver's watch of its processes: parallel/runner.py.) The peers'
buffers are passed as bare addresses (DevicePointer).
"""
from __future__ import annotations

import os

import torch

EMPTY = -32768  # int16 bits of -0.0 in bf16 and fp16: a slot element not written yet
# float32 rows use the same buffers as int32 words, whose "empty" pattern is two EMPTYs (0x80008000, a negative
# subnormal of -4.6e-41, which is sent as +0.0 when it occurs): slots cleared at either width read as empty at both.
EMPTY32 = -2147450880
SLOTS = 3
MAX_WORLD = 8
DEFAULT_TIMEOUT_S = 300.0  # the tensor-parallel group's default (parallel/group.py): a cold rank may compile long


class DevicePointer:
    """A device address as a Triton pointer argument (Triton takes any object with data_ptr() and a dtype, and
    specializes on its 16-byte alignment like a tensor's). The peers' buffers reach the kernel this way, from the
    symmetric-memory handle's buffer_ptrs: the kernel needs only their addresses, not tensors over them."""

    __slots__ = ("address", "dtype")

    def __init__(self, address: int, dtype: torch.dtype):
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


def _words(buffer, dtype: torch.dtype):
    """`buffer` (a tensor, or a DevicePointer) as a pointer to `dtype` words."""
    if isinstance(buffer, torch.Tensor):
        return buffer.view(dtype)
    return DevicePointer(buffer.data_ptr(), dtype)


def all_reduce_rms_norm_ref(partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks' partial rows summed in rank order in float32 and rounded, then rms_norm_ref's residual add and
    norm: (norm(sum + residual) * weight, sum + residual)."""
    from backend.kernels.rms_norm import rms_norm_ref

    total = torch.zeros_like(partials[0], dtype=torch.float32)
    for p in partials:
        total += p.float()
    return rms_norm_ref(total.to(partials[0].dtype), weight, eps, residual)


try:
    import triton.language as tl

    from backend.kernels._pdl import gdc_launch_dependents, gdc_wait
except ImportError:  # triton is optional on CPU: the reference above needs only torch
    tl = None

from backend.kernels._jit import lazy_jit
from backend.kernels._pdl import pdl_args


@lazy_jit
def _all_reduce_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, local_ptr, epoch_ptr,
                                peers, rank, hidden, eps, timeout_ns,
                                x_stride, res_stride, out_stride, sum_stride,
                                WORLD: tl.constexpr, MAX_ROWS: tl.constexpr, ROW_STRIDE: tl.constexpr,
                                BLOCK: tl.constexpr, WIDE: tl.constexpr, TIMEOUT: tl.constexpr, PDL: tl.constexpr):
    # One program per row. peers: a tuple of WORLD pointers, rank r's buffer as mapped here, as int16 words (WIDE:
    # int32 words, for float32 rows); ROW_STRIDE counts those words. Pointer arguments rather than a table of
    # addresses: Triton knows each (tuple element too) is 16-byte aligned, so the pushes over NVLink are 16-byte
    # stores; a pointer cast from an integer would have no known alignment.
    if PDL:  # see _pdl.py
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    epoch = tl.load(epoch_ptr + row)
    slot = epoch % 3
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if WIDE:
        empty = -2147450880
        bits = x.to(tl.int32, bitcast=True)
    else:
        empty = -32768
        bits = x.to(tl.int16, bitcast=True)
    bits = tl.where(bits == empty, 0, bits).to(bits.dtype)  # -0.0 travels as +0.0: the same number
    mine = ((slot * WORLD + rank) * MAX_ROWS + row) * ROW_STRIDE + cols
    for r in tl.static_range(WORLD):
        tl.store(peers[r] + mine, bits, mask=mask)
    # Loaded before the wait for the peers, so that their latency overlaps it instead of following it.
    res = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        src = local_ptr + ((slot * WORLD + r) * MAX_ROWS + row) * ROW_STRIDE + cols
        got = tl.load(src, mask=mask, other=0, volatile=True)
        pending = tl.sum(((got == empty) & mask).to(tl.int32), axis=0)
        if TIMEOUT:  # the interpreter runs no PTX
            start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [rank], dtype=tl.int64,
                                              is_pure=False, pack=1)
        while pending > 0:  # rank r's row has not all landed yet
            got = tl.load(src, mask=mask, other=0, volatile=True)
            pending = tl.sum(((got == empty) & mask).to(tl.int32), axis=0)
            if TIMEOUT:
                now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [rank], dtype=tl.int64,
                                                is_pure=False, pack=1)
                if (pending > 0) & (now - start > timeout_ns):  # the peer is gone: never return its row wrong
                    tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r,r", [rank], dtype=tl.int32,
                                              is_pure=False, pack=1)
        total += got.to(x.dtype, bitcast=True).to(tl.float32)
    # as _rms_norm_kernel: the sum rounded to the model's dtype, the residual added and rounded, then the norm
    h = (total.to(x.dtype).to(tl.float32) + res).to(x.dtype)
    tl.store(sum_ptr + row * sum_stride + cols, h, mask=mask)
    h32 = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h32 * h32, axis=0) / hidden + eps)
    tl.store(out_ptr + row * out_stride + cols, (h32 * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    stale = (((slot + 2) % 3) * WORLD * MAX_ROWS + row) * ROW_STRIDE + cols
    for r in tl.static_range(WORLD):
        tl.store(local_ptr + stale + r * MAX_ROWS * ROW_STRIDE, tl.full([BLOCK], empty, bits.dtype), mask=mask)
    tl.store(epoch_ptr + row, epoch + 1)


def all_reduce_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                               buffers: list, rank: int, epochs: torch.Tensor, max_rows: int, row_stride: int,
                               timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [rows, hidden] (unit stride along hidden; bf16, fp16 or fp32), this rank's partial sums and
    the residual stream -> (normed, summed) as all_reduce_rms_norm_ref over every rank's x. buffers[r]: rank r's
    int16 buffer as mapped here, a tensor or a DevicePointer ([SLOTS * world * max_rows * row_stride], all EMPTY
    before the first call; a float32 row takes two words per element, so at most row_stride / 2 of them); epochs:
    int32 [max_rows], this rank's call count per row. Every rank must make the same calls, or the others wait for
    it (timeout_s, then the kernel traps)."""
    import triton

    rows, hidden = x.shape
    world = len(buffers)
    wide = x.dtype == torch.float32
    buffers = [_words(b, torch.int32 if wide else torch.int16) for b in buffers]
    if wide:
        row_stride //= 2
    if not 1 <= world <= MAX_WORLD or rows > max_rows or hidden > row_stride:
        raise ValueError(f"all_reduce_rms_norm: {rows} rows x {hidden} over {world} ranks does not fit buffers of "
                         f"{max_rows} rows x {row_stride} for at most {MAX_WORLD} ranks")
    out, summed = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    _all_reduce_rms_norm_kernel[(rows,)](
        x, residual, weight, out, summed, buffers[rank], epochs, tuple(buffers), rank, hidden, eps,
        int(timeout_s * 1e9),
        x.stride(0), residual.stride(0), out.stride(0), summed.stride(0),
        WORLD=world, MAX_ROWS=max_rows, ROW_STRIDE=row_stride, BLOCK=block, WIDE=wide,
        TIMEOUT=os.environ.get("TRITON_INTERPRET") != "1",
        num_warps=4 if block <= 2048 else 8, **pdl_args(x.device))
    return out, summed
