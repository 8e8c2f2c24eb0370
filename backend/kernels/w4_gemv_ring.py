"""INT4 batch-1 GEMV whose weight loads run ahead through shared memory (Gluon, Hopper).

Why: the register GEMV in quant_matmul.py (_w4a16_gemv_kernel) holds one loop trip of weights per thread (8
words at 64 registers), so a program has loads in flight only while it waits for them, never while it computes:
its INT4 projections stream at ~79% of the copy rate where the bf16 GEMV reaches ~96% (perf/RESULTS.md, session
20). Loading more trips ahead in registers cost registers and was slower; Triton's own pipelining through shared
memory put nine CTA barriers and a layout change on every trip (sessions 19-21). Here each thread copies its own
16-byte slices of the weights into shared memory with cp.async, STAGES trips ahead (all trips, when they fit,
issued before the PDL wait since weights depend on no kernel), and reads them back in the same thread layout; or
(use_tma) the TMA engine copies a trip's [rows, BLOCKS, 4, 4] box on an mbarrier, issued by one thread. Triton's
shared-memory analysis still puts one CTA barrier after each trip's wait (it cannot see that the cp.async form's
threads read only their own copies), so compiled for sm_90 a trip costs one barrier, not nine. The arithmetic
per trip is the register GEMV's bf16x2 pairs loop (CHAIN of two words: see the comment above
_w4_gemv_trip_weights); x, the zero points and the scales are staged in shared memory once per program.

Scope: groups of 128 (one planar block per group), bf16 activations, K a multiple of BLOCKS * 128 and a row
count that fills whole programs; w4a16_gemv_triton takes its register kernel otherwise. Gluon has no
interpreter, so this kernel is tested on the GPU only (tests/kernels/test_quant_matmul.py) against the register
kernel and the float64 reference. EXPERIMENT: not yet timed on a GPU (perf/gpu_w4_ring.sh does).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from backend.kernels._pdl import gdc_launch_dependents, gdc_wait, is_hopper_or_later, pdl_args
from backend.kernels.quant_matmul import FMA_BF16X2, LOP3_AND_OR, MUL_BF16X2, SUB_BF16X2  # the register kernel's PTX

SMEM_BUDGET = 100 * 1024  # bytes a program may take, so that two 16-warp programs share an SM
only_shapes: set | None = None  # (weight rows, K) the kernel may take; None: all it supports (experiments)
# The copies by the TMA engine (one thread issues a [rows, BLOCKS, 4, 4] box a trip, completion on an mbarrier)
# instead of cp.async from every thread; a refilled slot then needs a CTA barrier first (other warps' reads).
use_tma = False
EVICTION = "evict_first"  # the weights' L2 policy, as quant_matmul.w4_weight_eviction


@gluon.jit
def _weight_pairs(words, z_pair, i: gl.constexpr):
    # bf16x2 (q - z) of nibbles i and i + 4 of each word (as quant_matmul._w4_weight_pairs)
    mask = gl.full(words.shape, 0x000F000F, gl.int32, words.type.layout)
    exponent = gl.full(words.shape, 0x43004300, gl.int32, words.type.layout)
    q_pair = gl.inline_asm_elementwise(LOP3_AND_OR, "=r,r,r,r", [words >> (4 * i), mask, exponent],
                                       dtype=gl.int32, is_pure=True, pack=1)
    return gl.inline_asm_elementwise(SUB_BF16X2, "=r,r,r", [q_pair, z_pair], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _bf16x2_fma(a, b, c):
    return gl.inline_asm_elementwise(FMA_BF16X2, "=r,r,r,r", [a, b, c], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _trip_products(words, z_smem, s_smem, x_smem, t: gl.constexpr, ROWS: gl.constexpr, BLOCKS: gl.constexpr,
                   W: gl.constexpr):
    # One trip's words [ROWS, BLOCKS, 8, 2] (layout W) -> the scaled float32 sums [ROWS, BLOCKS, 8] of the word
    # pairs' bf16x2 products (CHAIN of two words, as the register kernel)
    RBW: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, W))
    z = z_smem.slice(t * BLOCKS, BLOCKS, dim=1).load(RBW).to(gl.int32)
    z_pair = gl.expand_dims(gl.expand_dims((z + 0x4300) * 0x10001, 2), 3)  # bf16 128 + z in both halves
    for i in gl.static_range(4):
        x0, x1 = gl.split(gl.expand_dims(x_smem.index(i).slice(t * BLOCKS, BLOCKS).load(gl.SliceLayout(0, W)), 0))
        w0, w1 = gl.split(_weight_pairs(words, z_pair, i))
        if i == 0:
            pair_dot = gl.inline_asm_elementwise(MUL_BF16X2, "=r,r,r", [w0, x0], dtype=gl.int32, is_pure=True,
                                                 pack=1)
        else:
            pair_dot = _bf16x2_fma(w0, x0, pair_dot)
        pair_dot = _bf16x2_fma(w1, x1, pair_dot)
    s = s_smem.slice(t * BLOCKS, BLOCKS, dim=1).load(RBW).to(gl.float32)
    dot = (pair_dot << 16).to(gl.float32, bitcast=True) + (pair_dot & -65536).to(gl.float32, bitcast=True)
    return gl.expand_dims(s, 2) * dot


@gluon.jit
def _stage_x_and_groups(x_ptr, s_ptr, z_ptr, rows, ss_n, K: gl.constexpr, ROWS: gl.constexpr,
                        GROUPS_P2: gl.constexpr, RB: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr):
    # The program's zero points and scales (every group; before the PDL wait: weights depend on no kernel), then
    # x as int32 column pairs [i, block, pair, word] (nibbles i and i + 4 of word 2p + h of a block meet the
    # column pair block * 64 + i * 16 + 2p + h: to_planar_int4's layout), all in shared memory
    GROUPS: gl.constexpr = K // 128
    PLAIN3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    PLAIN2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    g = gl.arange(0, GROUPS_P2, layout=gl.SliceLayout(0, RB))
    sz_offsets = gl.expand_dims(rows.to(gl.int64) * ss_n, 1) + gl.expand_dims(g, 0)
    g_ok = gl.expand_dims(rows >= 0, 1) & gl.expand_dims(g < GROUPS, 0)
    z_smem = gl.allocate_shared_memory(gl.uint8, [ROWS, GROUPS_P2], PLAIN2)
    s_smem = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [ROWS, GROUPS_P2], PLAIN2)
    z_smem.store(gl.load(z_ptr + sz_offsets, mask=g_ok, other=0))
    s_smem.store(gl.load(s_ptr + sz_offsets, mask=g_ok, other=0.0))
    if PDL:  # see _pdl.py
        gdc_wait()
    X3: gl.constexpr = gl.BlockedLayout([1, 2, 2], [8, 4, 1], [num_warps, 1, 1], [2, 1, 0])
    xg = gl.arange(0, GROUPS_P2, layout=gl.SliceLayout(1, gl.SliceLayout(2, X3)))
    XW: gl.constexpr = gl.SliceLayout(0, X3)
    x_word = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(1, XW)) * 2, 1) + \
        gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(0, XW)), 0)
    x_offsets = gl.expand_dims(gl.expand_dims(xg * 64, 1), 2) + gl.expand_dims(x_word, 0)
    x_ok = gl.expand_dims(gl.expand_dims(xg < GROUPS, 1), 2) & gl.expand_dims(x_word >= 0, 0)
    x_smem = gl.allocate_shared_memory(gl.int32, [4, GROUPS_P2, 8, 2], PLAIN3)
    for i in gl.static_range(4):
        x_smem.index(i).store(gl.load(x_ptr + x_offsets + i * 16, mask=x_ok, other=0))
    gl.thread_barrier()
    return z_smem, s_smem, x_smem


@gluon.jit
def _store_rows(out_ptr, y, pid, rows, ROWS: gl.constexpr, GATED: gl.constexpr, GATE_UP_SPLIT: gl.constexpr,
                num_warps: gl.constexpr):
    # y [ROWS] (layout of rows) -> out: the rows, or SiLU(gate) * up of the gate/up rows (interleaved, or gate
    # rows first with GATE_UP_SPLIT)
    if GATED:
        if GATE_UP_SPLIT:
            ONE: gl.constexpr = gl.BlockedLayout([ROWS], [32], [num_warps], [0])  # all rows in each thread
            gate, up = gl.split(gl.permute(gl.reshape(gl.convert_layout(y, ONE), [2, ROWS // 2]), [1, 0]))
        else:
            PAIR: gl.constexpr = gl.BlockedLayout([2], [32], [num_warps], [0])  # a gate row and its up row
            gate, up = gl.split(gl.reshape(gl.convert_layout(y, PAIR), [ROWS // 2, 2]))
        out_n = pid * (ROWS // 2) + gl.arange(0, ROWS // 2, layout=gate.type.layout)
        gl.store(out_ptr + out_n, (gate / (1.0 + gl.exp(-gate)) * up).to(out_ptr.dtype.element_ty))
    else:
        gl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty))


@gluon.jit
def _w4a16_gemv_ring_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, sw_n, ss_n,
                            K: gl.constexpr, ROWS: gl.constexpr, BLOCKS: gl.constexpr, STAGES: gl.constexpr,
                            GROUPS_P2: gl.constexpr, GATED: gl.constexpr, EVICTION: gl.constexpr,
                            PDL: gl.constexpr, num_warps: gl.constexpr):
    TRIPS: gl.constexpr = K // (BLOCKS * 128)
    # The copies: [ROWS, BLOCKS, 4, 4] words, 16 bytes a thread; 8 lanes take 128 contiguous bytes (two blocks
    # of one row), so neither the copies into shared memory nor the reads back have bank conflicts.
    C: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [4, 2, 4, 1], [num_warps // (BLOCKS // 2), BLOCKS // 2, 1, 1],
                                       [3, 2, 1, 0])
    # The products: the same words per thread as [ROWS, BLOCKS, 8 pairs of words, 2]
    W: gl.constexpr = gl.BlockedLayout([1, 1, 2, 2], [4, 2, 4, 1], [num_warps // (BLOCKS // 2), BLOCKS // 2, 1, 1],
                                       [3, 2, 1, 0])
    RB: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, C))  # [ROWS, BLOCKS] of the copies
    R: gl.constexpr = gl.SliceLayout(1, RB)  # [ROWS]

    pid = gl.program_id(0)
    r = gl.arange(0, ROWS, layout=R)
    if GATED:  # even rows gate, odd rows the up rows they meet: output row pid * ROWS / 2 + r / 2
        rows = (r % 2) * N + pid * (ROWS // 2) + r // 2
    else:
        rows = pid * ROWS + r
    b = gl.arange(0, BLOCKS, layout=gl.SliceLayout(0, RB))
    PW: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, C))  # [4, 4]
    quad_word = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(1, PW)) * 4, 1) + \
        gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, PW)), 0)
    row_block = gl.expand_dims(rows.to(gl.int64) * sw_n, 1) + gl.expand_dims(b * 16, 0)
    w_ptrs = w_ptr + (gl.expand_dims(gl.expand_dims(row_block, 2), 3) + gl.expand_dims(gl.expand_dims(quad_word, 0), 0))

    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, ROWS, BLOCKS, 4, 4], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    for t in gl.static_range(STAGES):  # the first STAGES trips, before the PDL wait
        async_copy.async_copy_global_to_shared(w_smem.index(t), w_ptrs + t * (BLOCKS * 16), eviction_policy=EVICTION)
        async_copy.commit_group()
    z_smem, s_smem, x_smem = _stage_x_and_groups(x_ptr, s_ptr, z_ptr, rows, ss_n, K, ROWS, GROUPS_P2, RB, PDL,
                                                 num_warps)
    acc = gl.zeros([ROWS, BLOCKS, 8], gl.float32, gl.SliceLayout(3, W))
    for t in gl.static_range(TRIPS):
        async_copy.wait_group(STAGES - 1 if t + STAGES <= TRIPS else TRIPS - t - 1)  # this thread's trip t
        words = gl.convert_layout(gl.reshape(w_smem.index(t % STAGES).load(C), [ROWS, BLOCKS, 8, 2]), W,
                                  assert_trivial=True)
        acc += _trip_products(words, z_smem, s_smem, x_smem, t, ROWS, BLOCKS, W)
        if t + STAGES < TRIPS:  # refill the slot just read: this thread's own words, so no barrier
            async_copy.async_copy_global_to_shared(w_smem.index(t % STAGES), w_ptrs + (t + STAGES) * (BLOCKS * 16),
                                                   eviction_policy=EVICTION)
            async_copy.commit_group()
    if PDL:
        gdc_launch_dependents()
    y = gl.convert_layout(gl.sum(gl.sum(acc, axis=2), axis=1), R)  # [ROWS]
    _store_rows(out_ptr, y, pid, rows, ROWS, GATED, False, num_warps)


@gluon.jit
def _issue_trip(w_desc, w_smem, bars, t: gl.constexpr, slot: gl.constexpr, row0, N, ROWS: gl.constexpr,
                BLOCKS: gl.constexpr, GATED: gl.constexpr):
    # trip t's words of the program's rows into the slot, as one box (two when gated: gate rows, then up rows)
    bar = bars.index(slot)
    mbarrier.expect(bar, ROWS * BLOCKS * 64)
    if GATED:
        tma.async_copy_global_to_shared(w_desc, [row0, t * BLOCKS, 0, 0], bar, w_smem.index(slot).slice(0, ROWS // 2))
        tma.async_copy_global_to_shared(w_desc, [N + row0, t * BLOCKS, 0, 0], bar,
                                        w_smem.index(slot).slice(ROWS // 2, ROWS // 2))
    else:
        tma.async_copy_global_to_shared(w_desc, [row0, t * BLOCKS, 0, 0], bar, w_smem.index(slot))


@gluon.jit
def _w4a16_gemv_tma_kernel(x_ptr, w_desc, s_ptr, z_ptr, out_ptr, N, ss_n,
                           K: gl.constexpr, ROWS: gl.constexpr, BLOCKS: gl.constexpr, STAGES: gl.constexpr,
                           GROUPS_P2: gl.constexpr, GATED: gl.constexpr, PDL: gl.constexpr,
                           num_warps: gl.constexpr):
    # The ring kernel with its copies by the TMA engine (use_tma): w_desc views the words as [N, K / 128, 4, 4];
    # gated programs take their gate rows first, then the up rows.
    TRIPS: gl.constexpr = K // (BLOCKS * 128)
    C: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [4, 2, 4, 1], [num_warps // (BLOCKS // 2), BLOCKS // 2, 1, 1],
                                       [3, 2, 1, 0])
    W: gl.constexpr = gl.BlockedLayout([1, 1, 2, 2], [4, 2, 4, 1], [num_warps // (BLOCKS // 2), BLOCKS // 2, 1, 1],
                                       [3, 2, 1, 0])
    RB: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, C))
    R: gl.constexpr = gl.SliceLayout(1, RB)

    pid = gl.program_id(0)
    r = gl.arange(0, ROWS, layout=R)
    if GATED:
        row0 = pid * (ROWS // 2)
        rows = (r // (ROWS // 2)) * N + row0 + r % (ROWS // 2)
    else:
        row0 = pid * ROWS
        rows = row0 + r
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, ROWS, BLOCKS, 4, 4], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for t in gl.static_range(STAGES):
        mbarrier.init(bars.index(t), count=1)
    for t in gl.static_range(STAGES):  # before the PDL wait
        _issue_trip(w_desc, w_smem, bars, t, t, row0, N, ROWS, BLOCKS, GATED)
    z_smem, s_smem, x_smem = _stage_x_and_groups(x_ptr, s_ptr, z_ptr, rows, ss_n, K, ROWS, GROUPS_P2, RB, PDL,
                                                 num_warps)
    acc = gl.zeros([ROWS, BLOCKS, 8], gl.float32, gl.SliceLayout(3, W))
    for t in gl.static_range(TRIPS):
        mbarrier.wait(bars.index(t % STAGES), (t // STAGES) % 2)
        words = gl.convert_layout(gl.reshape(w_smem.index(t % STAGES).load(C), [ROWS, BLOCKS, 8, 2]), W,
                                  assert_trivial=True)
        acc += _trip_products(words, z_smem, s_smem, x_smem, t, ROWS, BLOCKS, W)
        if t + STAGES < TRIPS:  # every warp has read the slot before the engine refills it
            gl.thread_barrier()
            _issue_trip(w_desc, w_smem, bars, t + STAGES, t % STAGES, row0, N, ROWS, BLOCKS, GATED)
    if PDL:
        gdc_launch_dependents()
    y = gl.convert_layout(gl.sum(gl.sum(acc, axis=2), axis=1), R)
    _store_rows(out_ptr, y, pid, rows, ROWS, GATED, True, num_warps)


def ring_tile(N: int, K: int) -> dict:
    """The register kernel's shapes (quant_matmul.w4_gemv_tile at groups of 128): 16 rows a program, 16 blocks
    and 16 warps for long rows and narrow products, 8 and 8 otherwise; as many trips in flight as fit
    SMEM_BUDGET."""
    blocks, warps = (16, 16) if K >= 8192 or N <= 4096 else (8, 8)
    return dict(ROWS=16, BLOCKS=blocks, num_warps=warps)


def _stages(K: int, rows: int, blocks: int, scale_bytes: int) -> int:
    trips = K // (blocks * 128)
    groups_p2 = triton.next_power_of_2(K // 128)
    fixed = 4 * groups_p2 * 16 * 4 + rows * groups_p2 * (1 + scale_bytes) + 1024  # x, zeros and scales, slack
    per_trip = rows * blocks * 64
    return max(1, min(trips, (SMEM_BUDGET - fixed) // per_trip))


def takes(x: torch.Tensor, N: int, K: int, group_size: int, gated: bool, tile: dict | None = None) -> bool:
    """Whether the ring kernel serves this product (else the register kernel does)."""
    tile = tile or ring_tile(N // 2 if gated else N, K)
    rows_out = tile["ROWS"] // 2 if gated else tile["ROWS"]
    n_out = N // 2 if gated else N
    if only_shapes is not None and (N, K) not in only_shapes:
        return False
    return (x.is_cuda and x.dtype == torch.bfloat16 and group_size == 128 and K % (tile["BLOCKS"] * 128) == 0
            and n_out % rows_out == 0 and is_hopper_or_later(x.device))


def w4a16_gemv_ring(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    gated: bool = False, tile: dict | None = None, eviction: str = EVICTION) -> torch.Tensor:
    """x [1, K] bf16 -> [1, N] (or [1, N / 2] SiLU-and-mul when gated) over planar words at groups of 128.
    The caller checks `takes` first; scales and zeros share one row stride."""
    N, K = words.shape[0], x.shape[-1]
    n_out = N // 2 if gated else N
    tile = tile or ring_tile(n_out, K)
    rows_out = tile["ROWS"] // 2 if gated else tile["ROWS"]
    stages = tile.get("STAGES") or _stages(K, tile["ROWS"], tile["BLOCKS"], scales.element_size())
    out = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    x_pairs = (x if x.data_ptr() % 16 == 0 else x.clone()).contiguous().view(torch.int32)
    pdl = pdl_args(x.device)
    shape = dict(K=K, ROWS=tile["ROWS"], BLOCKS=tile["BLOCKS"], STAGES=stages,
                 GROUPS_P2=triton.next_power_of_2(K // 128), GATED=gated, PDL=pdl["PDL"], num_warps=tile["num_warps"])
    grid = (n_out // rows_out,)
    if tile.get("TMA", use_tma):
        boxes = words.view(N, K // 128, 4, 4)
        box = [rows_out if gated else tile["ROWS"], tile["BLOCKS"], 4, 4]
        desc = TensorDescriptor(boxes, list(boxes.shape), list(boxes.stride()), box,
                                gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=4))
        _w4a16_gemv_tma_kernel[grid](x_pairs, desc, scales, zeros, out, n_out, scales.stride(0), **shape,
                                     launch_pdl=pdl["launch_pdl"])
    else:
        _w4a16_gemv_ring_kernel[grid](x_pairs, words, scales, zeros, out, n_out, words.stride(0), scales.stride(0),
                                      EVICTION=eviction, **shape, launch_pdl=pdl["launch_pdl"])
    return out
