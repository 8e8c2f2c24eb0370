"""Weight-only quantized matrix products: y = x @ dequant(W)^T with 8-bit or 4-bit integer weights.

Layouts (W is [N, K], one row per output channel, as nn.Linear):
  INT8 per channel:  qweight int8 [N, K], scales [N] (w = q * s).
  INT4 group-wise:   qweight uint8 [N, K / 2], column pair (2j, 2j + 1) packed as low | high nibble;
                     scales [N, ceil(K / G)] and zeros uint8 [N, ceil(K / G)] per group of G input
                     columns, the last group shorter when G does not divide K (w = (q - z) * s, 0..15).
                     That is the checkpoint's layout and the references'. The INT4 kernels take the same codes
                     repacked once at load into group-planar int32 words (to_planar_int4, below).
The references dequantize and call a float matmul; the kernels dequantize tiles in registers.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K / 2] uint8 -> [..., K] uint8 values 0..15 (low nibble first)."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[..., K] integers 0..15 (K even) -> [..., K / 2] uint8."""
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


# Group-planar INT4 (the kernels' layout): K is cut into blocks of B = planar_block(K, G) columns (a block never
# straddles two groups), each row of a block is W = B / 8 int32 words, and word j holds at nibbles i and i + 4
# (bits 4i..4i+3 and 16+4i..16+4i+3, i < 4) the codes of the adjacent columns i * B / 4 + 2j and i * B / 4 + 2j + 1.
# Columns past K (when B does not divide K) hold code 0.
# Why: a GEMV thread holding some words of a row meets, for each i, one contiguous slice of x in column pairs,
# which it loads with vector loads in the words' own register layout (with packed pairs, word j = columns
# 8j..8j+7, it would meet x at stride 8, and Triton stages such loads through shared memory with a barrier per
# nibble); and nibbles i and i + 4 sit in the two halves of the word at the same offset, the halves of one
# bf16x2, facing one 32-bit word of bf16 x: the bf16 GEMV multiplies both in one instruction with no shuffling of
# x. (Marlin and TensorRT-LLM likewise reorder 4-bit weights at load for their GEMM kernels.)
def planar_block(K: int, group_size: int) -> int:
    """Columns per planar block: 128, or the group when it is smaller (and not the whole row)."""
    return group_size if group_size < 128 and group_size != K else 128


def planar_columns(block: int) -> torch.Tensor:
    """[8, B / 8]: the column within its block of nibble i of word j (the layout above)."""
    i = torch.arange(8).view(8, 1)
    j = torch.arange(block // 8).view(1, -1)
    return (i % 4) * (block // 4) + 2 * j + i // 4


def to_planar_int4(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K / 2] packed pairs -> [N, ceil(K / B) * B / 8] int32 group-planar words (same device)."""
    codes = unpack_int4(qweight)
    N, K = codes.shape
    block = planar_block(K, group_size)
    blocks = -(-K // block)
    padded = torch.zeros(N, blocks, block, dtype=torch.uint8, device=codes.device)
    padded.view(N, -1)[:, :K] = codes
    columns = planar_columns(block).to(codes.device)
    words = torch.zeros(N, blocks, block // 8, dtype=torch.int32, device=codes.device)
    for i in range(8):  # int32 shifts wrap: nibble 7 lands in the sign bit, as the kernels read it
        words |= padded[:, :, columns[i]].to(torch.int32) << (4 * i)
    return words.reshape(N, blocks * block // 8)


def from_planar_int4(words: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """Inverse of to_planar_int4: [N, K / 2] packed pairs."""
    N = words.shape[0]
    block = planar_block(K, group_size)
    w = words.to(torch.int64).view(N, -1, 1, block // 8)
    nibbles = (w >> (4 * torch.arange(8, device=words.device).view(1, 1, 8, 1))) & 0xF  # [N, blocks, i, j]
    codes = torch.empty(N, w.shape[1], block, dtype=torch.uint8, device=words.device)
    codes[:, :, planar_columns(block).to(words.device).flatten()] = nibbles.flatten(2).to(torch.uint8)
    return pack_int4(codes.view(N, -1)[:, :K])


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float().reshape(-1, 1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_int4(qweight).float()
    K = q.shape[1]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :K]  # the last group may be shorter
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :K]
    return (q - z) * s


def w8a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype, computed in float32."""
    return (x.float() @ dequantize_int8(qweight, scales).T).to(x.dtype)


def w4a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    return (x.float() @ dequantize_int4(qweight, scales, zeros, group_size).T).to(x.dtype)


# ---- Triton kernels -----------------------------------------------------------------------------------------
# The W8A16 tiled kernel, launched in two shapes (see plan_launch; INT4 has its own paths further down):
#   small M (decode, 1-16 rows): BLOCK_M 16 and split-K. A batch-1 product is a GEMV that only reads
#     weights; N / BLOCK_N programs alone leave SMs idle for N = 4096 (64 programs on 132 SMs), so K is split
#     across programs whose partial products are summed with atomic adds into a zeroed output.
#   large M (prefill): 64x128 or 128x128 tiles, no split, grouped tile order for L2 reuse of x.
# Integer weights are converted to the activation dtype exactly (|q - z| <= 15 and |q| <= 127 fit bf16's
# 8-bit mantissa); scales multiply the fp32 dot result, per K tile for INT4 (BLOCK_K divides the group) and
# once in the epilogue for INT8, so the dequantized weight is never rounded.
try:
    import triton.language as tl

    from backend.kernels._pdl import gdc_launch_dependents, gdc_wait
except ImportError:  # triton is optional on CPU: the references above need only torch
    tl = None

from backend.kernels._jit import lazy_jit
from backend.kernels import _pdl
from backend.kernels._pdl import pdl_args


@lazy_jit(do_not_specialize=["M"])
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, k_per_split, sx_m, sw_n, so_m,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # see _pdl.py
        gdc_wait()
    # Grouped tile order: GROUP_M row tiles sweep the column tiles together, so their x rows stay in L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm, nm = rm < M, rn < N
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * sx_m
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * sw_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        km = k < k_end
        x = tl.load(x_rows + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=km[:, None] & nm[None, :], other=0)
        acc += tl.dot(x, w.to(x.dtype))
    if PDL:
        gdc_launch_dependents()
    s = tl.load(s_ptr + rn, mask=nm, other=0.0).to(tl.float32)
    out = (acc * s[None, :]).to(out_ptr.dtype.element_ty)
    dst = out_ptr + rm.to(tl.int64)[:, None] * so_m + rn[None, :]
    if ATOMIC:
        tl.atomic_add(dst, out, mask=mm[:, None] & nm[None, :], sem="relaxed")
    else:
        tl.store(dst, out, mask=mm[:, None] & nm[None, :])


# (word & mask) | exponent in one instruction: the INT4 kernels' int -> float conversion (the GEMV's comment below
# says why and how).
LOP3_AND_OR = tl.constexpr("lop3.b32 $0, $1, $2, $3, 0xEA;") if tl is not None else None  # (a & b) | c
# b ? a ^ c : c, bit by bit: the INT8 GEMV's byte -> float conversion with the sign flip folded in (its MAGIC)
LOP3_MUX_XOR = tl.constexpr("lop3.b32 $0, $1, $2, $3, 0x6A;") if tl is not None else None
# Packed bf16 pairs (sm_90 for sub and mul): the INT4 GEMV's PAIRS loop
SUB_BF16X2 = tl.constexpr("sub.rn.bf16x2 $0, $1, $2;") if tl is not None else None
MUL_BF16X2 = tl.constexpr("mul.rn.bf16x2 $0, $1, $2;") if tl is not None else None
FMA_BF16X2 = tl.constexpr("fma.rn.bf16x2 $0, $1, $2, $3;") if tl is not None else None
# Two fp16 (low, high half) -> two bf16 in the same halves (cvt.rn.bf16x2.f32 d, a, b puts a in the high half)
FP16X2_TO_BF16X2 = tl.constexpr("{ .reg .f16 lo, hi; .reg .f32 flo, fhi; mov.b32 {lo, hi}, $1; cvt.f32.f16 flo, lo; "
                                "cvt.f32.f16 fhi, hi; cvt.rn.bf16x2.f32 $0, fhi, flo; }") if tl is not None else None


# Helpers of the INT4 batch-1 GEMV and its pairs loop (below).
@lazy_jit
def _fp16_pairs_to_bf16(x_pair, INLINE_ASM: tl.constexpr):
    # int32 words of two fp16 -> the same two rounded to bf16, in the same halves
    if INLINE_ASM:
        return tl.inline_asm_elementwise(FP16X2_TO_BF16X2, "=r,r", [x_pair], dtype=tl.int32, is_pure=True, pack=1)
    x_lo = (x_pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.bfloat16)  # the interpreter runs no PTX
    x_hi = (x_pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.bfloat16)
    return (x_hi.to(tl.int16, bitcast=True).to(tl.int32) << 16) \
        | (x_lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)


@lazy_jit
def _w4_nibbles_under_exponent(words, high, i: tl.constexpr, INLINE_ASM: tl.constexpr):
    # Nibble i of the words and of their high halves (high = words >> 16) in place under the float32 exponent of
    # 2^(23 - 4i): each reads as 2^(23 - 4i) + q exactly (its bits weigh 2^-4i); (word & mask) | exponent is one
    # lop3 (lookup table 0xEA)
    mask = tl.full(words.shape, 0xF << (4 * i), tl.int32)
    exponent = tl.full(words.shape, (150 - 4 * i) << 23, tl.int32)
    if not INLINE_ASM:  # the interpreter runs no PTX
        return (words & mask) | exponent, (high & mask) | exponent
    low_bits = tl.inline_asm_elementwise(LOP3_AND_OR, "=r,r,r,r", [words, mask, exponent], dtype=tl.int32,
                                         is_pure=True, pack=1)
    high_bits = tl.inline_asm_elementwise(LOP3_AND_OR, "=r,r,r,r", [high, mask, exponent], dtype=tl.int32,
                                          is_pure=True, pack=1)
    return low_bits, high_bits


@lazy_jit
def _w4_weight_pairs(words, z_pair, i: tl.constexpr, INLINE_ASM: tl.constexpr):
    # bf16x2 (q - z) of nibbles i and i + 4 of each word (exact: 128 + q under bf16's exponent of 128, less 128 + z)
    mask = tl.full(words.shape, 0x000F000F, tl.int32)
    exponent = tl.full(words.shape, 0x43004300, tl.int32)
    if not INLINE_ASM:  # the interpreter subtracts z in float32 (_pair_dot_emulated)
        return ((words >> (4 * i)) & mask) | exponent
    q_pair = tl.inline_asm_elementwise(LOP3_AND_OR, "=r,r,r,r", [words >> (4 * i), mask, exponent], dtype=tl.int32,
                                       is_pure=True, pack=1)
    return tl.inline_asm_elementwise(SUB_BF16X2, "=r,r,r", [q_pair, z_pair], dtype=tl.int32, is_pure=True, pack=1)


@lazy_jit
def _bf16_low(v):
    # the low bf16 of int32 words as float32
    return (v << 16).to(tl.float32, bitcast=True)


@lazy_jit
def _bf16_high(v):
    return (v & -65536).to(tl.float32, bitcast=True)


@lazy_jit
def _pair_dot_emulated(q_pair, z_pair, x_pair):
    # Both halves' (q - z) * x summed in float32: what a bf16x2 FMA adds up, for the interpreter (no PTX)
    low = (_bf16_low(q_pair) - _bf16_low(z_pair)) * _bf16_low(x_pair)
    high = (_bf16_high(q_pair) - _bf16_high(z_pair)) * _bf16_high(x_pair)
    return low + high


# INT4 for 1 < M < DEQUANT_MIN_M: a K tile is one planar block (BLOCK_K == B, one scale and zero point per row).
# With blocks of 128 columns nibbles i and i + 4 of the words are one [BLOCK_N, 32] tile of contiguous columns
# (interleaved), and a K tile is four tl.dot of depth 32 on contiguous x slices. Smaller blocks (groups of 32 or
# 64) have planes too thin for a dot: their tile is unpacked into word-major order (position 8j + i holds nibble i
# of word j: three rounds of tl.interleave) and x is gathered at the matching columns, for one dot of full depth.
# (Gathering x for 128-column blocks made INT4 decode at batch 64 2.8x slower on an H100: 0.69x -> 0.25x bf16.)
# The zero point is subtracted per weight (q - z is exact in bf16); folding it out as s * (x . q - z * sum(x))
# measured ~20% slower (perf/results/h100-tune_w4_matmul.json). Codes become floats by the GEMV's exponent trick
# (below), not by the conversion instruction, which runs at 16 per clock per SM and bounded this loop (SASS for
# sm_90: one I2F per nibble).
@lazy_jit(do_not_specialize=["M"])
def _w4a16_join_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, k_per_split, sx_m, sw_n, ss_n, so_m,
                       GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ATOMIC: tl.constexpr,
                       SWAP_AB: tl.constexpr, INLINE_ASM: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # see _pdl.py
        gdc_wait()
    WORDS: tl.constexpr = BLOCK_K // 8
    # Grouped tile order: GROUP_M row tiles sweep the column tiles together, so their x rows stay in L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    position = tl.arange(0, BLOCK_K)
    nibble = position % 8
    column = nibble % 4 * (BLOCK_K // 4) + 2 * (position // 8) + nibble // 4  # of word-major position 8j + i
    rw = tl.arange(0, WORDS)
    mm, nm = rm < M, rn < N
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * sx_m
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * sw_n
    sz_rows = rn.to(tl.int64) * ss_n
    # SWAP_AB: the product is accumulated transposed, [BLOCK_N, BLOCK_M] = W x^T, so the dequantized weight is
    # the dot's first operand (Hopper's wgmma reads that one from registers, and takes 64-row tiles of it even when M
    # is small) and x^T the second.
    acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        words = tl.load(w_rows + (k0 // 8 + rw)[None, :], mask=nm[:, None], other=0)
        group = k0 // GROUP_SIZE
        s = tl.load(s_ptr + sz_rows + group, mask=nm, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_rows + group, mask=nm, other=0).to(tl.float32)[:, None]
        if WORDS >= 16:  # one dot per pair of nibble planes (i and i + 4: 2 * WORDS adjacent columns)
            part = tl.zeros([BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N], dtype=tl.float32)
            high = words >> 16
            for i in tl.static_range(4):
                k = k0 + i * (2 * WORDS) + tl.arange(0, 2 * WORDS)
                x = tl.load(x_rows + k[None, :], mask=mm[:, None] & (k < K)[None, :], other=0.0)
                bits_lo, bits_hi = _w4_nibbles_under_exponent(words, high, i, INLINE_ASM)
                bits = tl.interleave(bits_lo, bits_hi)  # [BLOCK_N, 2 * WORDS], in column order
                q = (bits.to(tl.float32, bitcast=True) - (z + 2.0 ** (23 - 4 * i))).to(x.dtype)  # q - z, exact
                if SWAP_AB:
                    part += tl.dot(q, tl.trans(x))
                else:
                    part += tl.dot(x, tl.trans(q))
        else:  # one dot over the tile in word-major order
            k = k0 + column
            x = tl.load(x_rows + k[None, :], mask=mm[:, None] & (k < K)[None, :], other=0.0)
            evens = tl.interleave(tl.interleave((words >> 0) & 0xF, (words >> 16) & 0xF),
                                  tl.interleave((words >> 8) & 0xF, (words >> 24) & 0xF))
            odds = tl.interleave(tl.interleave((words >> 4) & 0xF, (words >> 20) & 0xF),
                                 tl.interleave((words >> 12) & 0xF, (words >> 28) & 0xF))
            q = tl.interleave(evens, odds) | 0x4B000000  # [BLOCK_N, BLOCK_K]: 2^23 + q
            q = (q.to(tl.float32, bitcast=True) - (z + 8388608.0)).to(x.dtype)
            part = tl.dot(q, tl.trans(x)) if SWAP_AB else tl.dot(x, tl.trans(q))
        acc += part * (s[:, None] if SWAP_AB else s[None, :])
    if PDL:
        gdc_launch_dependents()
    out = (tl.trans(acc) if SWAP_AB else acc).to(out_ptr.dtype.element_ty)
    dst = out_ptr + rm.to(tl.int64)[:, None] * so_m + rn[None, :]
    if ATOMIC:
        tl.atomic_add(dst, out, mask=mm[:, None] & nm[None, :], sem="relaxed")
    else:
        tl.store(dst, out, mask=mm[:, None] & nm[None, :])


# INT4 -> dense [N, K] weight in the activation dtype, for the large-M path (dequantize, then cuBLAS). One program
# per [BLOCK_N, block] tile (one scale and zero point per row); nibbles i and i + 4, interleaved, are stored as
# one contiguous slice of B / 4 columns.
@lazy_jit
def _dequantize_int4_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, sw_n, ss_n, so_n,
                            GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_K // 8
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    j = tl.arange(0, WORDS)
    nm = rows < N
    words = tl.load(w_ptr + rows[:, None] * sw_n + (k0 // 8 + j)[None, :], mask=nm[:, None], other=0)
    group = k0 // GROUP_SIZE
    s = tl.load(s_ptr + rows * ss_n + group, mask=nm, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows * ss_n + group, mask=nm, other=0).to(tl.int32)
    for i in tl.static_range(4):  # nibbles i and i + 4: 2 * WORDS adjacent columns
        k = k0 + i * (2 * WORDS) + tl.arange(0, 2 * WORDS)
        codes = tl.interleave((words >> (4 * i)) & 0xF, (words >> (16 + 4 * i)) & 0xF)
        w = (codes - z[:, None]).to(tl.float32) * s[:, None]
        tl.store(out_ptr + rows[:, None] * so_n + k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=nm[:, None] & (k < K)[None, :])


# INT8 -> dense [N, K] weight (q * s in fp32, rounded once), for W8A16's large-M path (dequantize, then cuBLAS).
@lazy_jit
def _dequantize_int8_kernel(w_ptr, s_ptr, out_ptr, N, K, sw_n, so_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (k < K)[None, :]
    q = tl.load(w_ptr + rows[:, None] * sw_n + k[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * so_n + k[None, :], (q.to(tl.float32) * s[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask)


# Batch 1 (decode of one sequence) takes a GEMV over the group-planar words. A program owns TILES tiles of BLOCK_N
# rows, walked BLOCKS planar blocks at a time, in tensors [BLOCK_N, BLOCKS, TILES, WORDS]: in Triton's layout a
# thread holds the same 4 adjacent words (one 16-byte load) of several rows, so each x value it loads and converts
# serves that many rows (two in the default tiles, whose 8 words a thread per trip the sm_90 cubin shows as two
# weight loads of 16 bytes and four of x). Per nibble the work is one lop3 (the nibble masked in place and or-ed
# into the exponent of 2^(23 - 4i), which reads as 2^(23 - 4i) + q exactly; with both constants in registers: as plain
# Triton the and and the or stay two instructions), one subtraction of 2^(23 - 4i) + z (exact), and one FMA with
# x. The nibbles i >= 4 take the same masks after one shift of the word by 16. The scale multiplies each block's
# sum. (The 2^23 mantissa trick is FasterTransformer's and Marlin's; giving each nibble position its own exponent
# spares both the shift per nibble and a power of 16 on x.) When the blocks come in whole trips (EVEN_K) the loop
# has no masks on K. The issue rate bounds this loop, so instructions per nibble are what count: compiled for
# sm_90, the loop of session 7's form (two tiles, x scaled by 16^-i, zeroed block sums, K masks) took 5.6 per
# nibble, this one 4.3-4.9. On an H100, from HBM, one run (perf/tune_quant_gemv.py, session 12): qkv 9.2 -> 8.0 us,
# o 7.2 -> 6.5, gate_up 33.0 -> 30.3, down 21.8 -> 18.0 with one tile for all, outputs bit-identical.
# Session 7's measurements of the earlier forms (perf/exp_w4_planar.py at dbaf188): the packed-pair GEMV, whose x
# loads went through shared memory, took 45.2 us on gate_up; the conversion instruction in place of the lop3 was
# 15-25% slower. The x loads stay in the words' layout only while a tile's x slice has fewer elements than the
# program has threads (Triton rematerializes only such loads): BLOCKS * B / 8 < 32 * num_warps.
# PAIRS (bf16 activations): nibbles i and i + 4 of a word sit at bits 4i and 16 + 4i, so one shift of the word by
# 4i and one lop3 with the bf16 exponent of 128 in both halves give the bf16x2 pair (128 + q_i, 128 + q_{i+4})
# (bf16's 7 mantissa bits hold a nibble only at bits 0-3 of a half: hence the shift, which fp16 tricks avoid).
# One bf16x2 subtraction of (128 + z) makes both weights exact, one bf16x2 FMA multiplies them by their columns'
# activations (adjacent columns in the planar layout: one int32 word of x, loaded as such) and sums the pairs of
# CHAIN words (8 pairs at the default 2); the halves go to float32 at the block's end. The cost is precision: each
# product and each step of the sums is rounded to bf16 (relative 2^-9, as a dequantize-to-bf16 kernel rounds each
# weight), where the float32 loop is exact up to its sums (output error over output norm, simulated in float64:
# 3.1e-3 over one word, 3.8e-3 over two, against 1.6e-3 for rounding the output to bf16; perf/RESULTS.md, session
# 18). Compiled for sm_90 (nvdisasm of the cubin, default qkv tile), the loop's trip over the 8 words of a thread
# is 189 instructions with chains of two words, 205 with one, 226 when x pairs were gathered from two loads by
# byte permutes (session 17's layout, nibbles i and i + 4 then B / 8 columns apart), 326 for the float32 loop.
@lazy_jit
def _w4_gemv_trip_weights(w_rows, z_ptr, sz_rows, row_ok, b0, num_blocks, GROUP_SIZE: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCKS: tl.constexpr, EVEN_K: tl.constexpr, EVICTION: tl.constexpr):
    # One trip's packed words [BLOCK_N, BLOCKS, TILES, WORDS] and zero points, and where its scales are
    WORDS: tl.constexpr = BLOCK_K // 8
    block = b0 + tl.arange(0, BLOCKS)
    word = (block[:, None] * WORDS + tl.arange(0, WORDS)[None, :])[None, :, None, :]
    group = ((block * BLOCK_K) // GROUP_SIZE)[None, :, None]
    if EVEN_K:  # whole trips of blocks and of x: only rows past N are masked
        sz_ok = row_ok[:, None, :]
        packed = tl.load(w_rows + word, mask=row_ok[:, None, :, None], other=0, eviction_policy=EVICTION)
    else:
        sz_ok = row_ok[:, None, :] & (block < num_blocks)[None, :, None]
        packed = tl.load(w_rows + word, mask=sz_ok[:, :, :, None], other=0, eviction_policy=EVICTION)
    z = tl.load(z_ptr + sz_rows + group, mask=sz_ok, other=0).to(tl.int32)[:, :, :, None]
    return packed, z, block, group, sz_ok


@lazy_jit
def _w4_gemv_trip_dot(x_ptr, packed, z, block, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      INLINE_ASM: tl.constexpr, PAIRS: tl.constexpr, CHAIN: tl.constexpr, X_FP16: tl.constexpr):
    # One trip's products with x, summed over each word (each CHAIN words with PAIRS): float32, before the scales
    BLOCK_N: tl.constexpr = packed.shape[0]
    BLOCKS: tl.constexpr = packed.shape[1]
    TILES: tl.constexpr = packed.shape[2]
    WORDS: tl.constexpr = BLOCK_K // 8
    j = tl.arange(0, WORDS)
    if CHAIN == 2:  # the words of each chain: 2c + h
        packed_sets = tl.split(tl.reshape(packed, [BLOCK_N, BLOCKS, TILES, WORDS // 2, 2]))
    # nibbles i and i + 4 of word j: the column pair i * WORDS + j of the block (to_planar_int4's layout)
    pairs = block[:, None] * (BLOCK_K // 2) + j[None, :]
    if PAIRS:  # nibbles i and i + 4 of a word are the halves of one bf16x2 (see the comment above the kernel)
        z_pair = (z + 0x4300) * 0x10001  # bf16 128 + z in both halves
    else:
        high = packed >> 16
        zf = z.to(tl.float32)
    for i in tl.static_range(4):
        pair = pairs + i * WORDS
        if PAIRS:  # x_ptr points at x as int32 words: a pair's two 16-bit activations in one load
            if EVEN_K:
                x_pair = tl.load(x_ptr + pair)
            else:
                x_pair = tl.load(x_ptr + pair, mask=2 * pair < K, other=0)
            if X_FP16:  # once for all the rows a thread takes
                x_pair = _fp16_pairs_to_bf16(x_pair, INLINE_ASM)
            x_pair = x_pair[None, :, None, :]
        elif EVEN_K:
            x_lo = tl.load(x_ptr + 2 * pair)
            x_hi = tl.load(x_ptr + 2 * pair + 1)
        else:  # K is even: a pair is whole or past K
            x_lo = tl.load(x_ptr + 2 * pair, mask=2 * pair < K, other=0.0)
            x_hi = tl.load(x_ptr + 2 * pair + 1, mask=2 * pair < K, other=0.0)
        if PAIRS and INLINE_ASM:  # 128 + q in each half: one lop3; q - z exactly; then the products and sums
            if CHAIN == 2:  # x split as the words are
                x_sets = tl.split(tl.reshape(x_pair, [1, BLOCKS, 1, WORDS // 2, 2]))
            for h in tl.static_range(CHAIN):
                w_pair = _w4_weight_pairs(packed if CHAIN == 1 else packed_sets[h], z_pair, i, True)
                x_set = x_pair if CHAIN == 1 else x_sets[h]
                if i == 0 and h == 0:
                    pair_dot = tl.inline_asm_elementwise(MUL_BF16X2, "=r,r,r", [w_pair, x_set], dtype=tl.int32,
                                                         is_pure=True, pack=1)
                else:
                    pair_dot = tl.inline_asm_elementwise(FMA_BF16X2, "=r,r,r,r", [w_pair, x_set, pair_dot],
                                                         dtype=tl.int32, is_pure=True, pack=1)
        elif PAIRS:  # the interpreter runs no PTX: the same halves, summed in float32
            term = _pair_dot_emulated(_w4_weight_pairs(packed, z_pair, i, False), z_pair, x_pair)
            if i == 0:
                dot = term
            else:
                dot += term
        else:
            q_lo, q_hi = _w4_nibbles_under_exponent(packed, high, i, INLINE_ASM)
            bias = zf + 2.0 ** (23 - 4 * i)  # exact: integers below 2^24
            term = (q_lo.to(tl.float32, bitcast=True) - bias) * x_lo.to(tl.float32)[None, :, None, :]
            if i == 0:  # the first products start the block's sums: no zeroed registers to add them to
                dot = term
            else:
                dot += term
            dot += (q_hi.to(tl.float32, bitcast=True) - bias) * x_hi.to(tl.float32)[None, :, None, :]
    if PAIRS and INLINE_ASM:  # the two halves' sums, in float32 from here on
        dot = _bf16_low(pair_dot) + _bf16_high(pair_dot)
    return dot


@lazy_jit
def _w4a16_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, num_blocks, sw_n, ss_n,
                       GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCKS: tl.constexpr, EVEN_K: tl.constexpr, INLINE_ASM: tl.constexpr, GATED: tl.constexpr,
                       EVICTION: tl.constexpr, PAIRS: tl.constexpr, CHAIN: tl.constexpr, X_FP16: tl.constexpr,
                       PRELOAD: tl.constexpr, PDL: tl.constexpr):
    # EVICTION: the packed weights' L2 eviction policy (w8_weight_eviction says why). PAIRS (bf16 x only): two
    # nibbles per instruction in bf16x2 arithmetic (the comment above says how). CHAIN (1 or 2; 2 with PAIRS and
    # INLINE_ASM only): each bf16x2 sum runs over the pairs of that many words (adjacent in a
    # thread's registers) before going to float32 (fewer conversions, a longer bf16 sum). X_FP16 (with PAIRS):
    # x is fp16, each pair rounded to bf16x2 as it is loaded (the products then as a bf16 model's). PRELOAD: the
    # first trip's weights, zero points and scales are loaded before the PDL wait and used at once after it, as
    # the bf16 and INT8 GEMVs do (_pdl.preload_first_tile): INT4 + INT8 head 2.065 -> 1.994 ms per 8B batch-1 step
    # on an H100 (perf/RESULTS.md, session 20).
    tile = tl.arange(0, TILES)[None, :]
    n = tl.arange(0, BLOCK_N)[:, None]
    if GATED:  # weight [gate; up], output silu(gate) * up: even tiles take gate rows, odd tiles the up rows they meet
        out_rows = tl.program_id(0) * (TILES // 2 * BLOCK_N) + tile // 2 * BLOCK_N + n
        rows = out_rows + tile % 2 * N
    else:
        rows = tl.program_id(0) * (TILES * BLOCK_N) + tile * BLOCK_N + n
        out_rows = rows
    # Tensors are [BLOCK_N, BLOCKS, TILES, WORDS]: a thread holds the same words of several rows (see above)
    row_ok = out_rows < N  # [BLOCK_N, TILES or 1]
    w_rows = w_ptr + rows.to(tl.int64)[:, None, :, None] * sw_n
    sz_rows = rows.to(tl.int64)[:, None, :] * ss_n
    if PRELOAD:
        packed, z, block, group, sz_ok = _w4_gemv_trip_weights(w_rows, z_ptr, sz_rows, row_ok, 0, num_blocks,
                                                               GROUP_SIZE, BLOCK_K, BLOCKS, EVEN_K, EVICTION)
        s = tl.load(s_ptr + sz_rows + group, mask=sz_ok, other=0.0).to(tl.float32)[:, :, :, None]
    if PDL:  # see _pdl.py
        gdc_wait()
    if PRELOAD:
        acc = s * _w4_gemv_trip_dot(x_ptr, packed, z, block, K, BLOCK_K, EVEN_K, INLINE_ASM, PAIRS, CHAIN, X_FP16)
    else:
        acc = tl.zeros([BLOCK_N, BLOCKS, TILES, BLOCK_K // 8 // CHAIN], dtype=tl.float32)
    for b0 in range(BLOCKS if PRELOAD else 0, num_blocks, BLOCKS):
        packed, z, block, group, sz_ok = _w4_gemv_trip_weights(w_rows, z_ptr, sz_rows, row_ok, b0, num_blocks,
                                                               GROUP_SIZE, BLOCK_K, BLOCKS, EVEN_K, EVICTION)
        dot = _w4_gemv_trip_dot(x_ptr, packed, z, block, K, BLOCK_K, EVEN_K, INLINE_ASM, PAIRS, CHAIN, X_FP16)
        s = tl.load(s_ptr + sz_rows + group, mask=sz_ok, other=0.0).to(tl.float32)[:, :, :, None]
        acc += s * dot
    if PDL:
        gdc_launch_dependents()
    y = tl.sum(tl.sum(acc, axis=3), axis=1)  # [BLOCK_N, TILES]
    if GATED:
        gate, up = tl.split(tl.reshape(y, [BLOCK_N, TILES // 2, 2]))
        out_n = tl.program_id(0) * (TILES // 2 * BLOCK_N) + tl.arange(0, TILES // 2)[None, :] * BLOCK_N + n
        tl.store(out_ptr + out_n, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=out_n < N)
    else:
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


# Batch-1 W8A16: the bf16 GEMV's shape (backend/kernels/gemv.py) over int8 rows. BLOCK_N rows per program,
# K walked in chunks of WORDS int32 words (4 int8 weights each, so a row's chunk arrives in 16-byte loads),
# fp32 products summed once at the end; the per-channel scale factors out of a row's dot product, so it is
# applied once per row. (FasterTransformer's exponent trick for int8 -> float, measured against the plain
# conversion here on an H100, changed nothing: the loads bound this kernel, not the conversion.)
@lazy_jit
def _w8a16_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, sw_n, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                       PRELOAD: tl.constexpr, GATED: tl.constexpr, EVICTION: tl.constexpr, X_WORDS: tl.constexpr,
                       MAGIC: tl.constexpr, INLINE_ASM: tl.constexpr, PDL: tl.constexpr):
    # EVICTION: the weight loads' L2 eviction policy (w8_weight_eviction says why). X_WORDS: x_ptr points at x
    # as int64 words, the 4 activations of one weight word each: one load and one layout change per chunk
    # instead of four (each of Triton's layout changes for x here is a round trip through shared memory with
    # two barriers). MAGIC: bytes become floats by placing them under a float exponent (one lop3, as the INT4
    # kernels do) instead of a bit-field extract and an int -> float conversion (a quarter-rate instruction).
    r = tl.arange(0, BLOCK_N)
    if GATED:  # weight [gate; up], output silu(gate) * up: rows pair up as in gemv.py's kernel
        out_rows = tl.program_id(0) * (BLOCK_N // 2) + r // 2
        rows = out_rows + (r % 2) * N
    else:
        out_rows = tl.program_id(0) * BLOCK_N + r
        rows = out_rows
    words = tl.arange(0, WORDS)
    if X_WORDS:  # 8-byte weight loads: the weights' layout is then x's (2 words a thread), with no change between
        words = tl.max_contiguous(words, 2)
    row_ok = out_rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * sw_n
    num_words = K // 4
    if PRELOAD:  # the first tile and the scales before the wait, as gemv.py's kernel (_pdl.preload_first_tile)
        first_ok = row_ok[:, None] & (words < num_words)[None, :]
        packed_first = tl.load(w_rows + words[None, :], mask=first_ok, other=0, eviction_policy=EVICTION)
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if PDL:  # see _pdl.py
        gdc_wait()
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    if PRELOAD:  # used at once, as in gemv.py
        if X_WORDS:
            x_first = tl.load(x_ptr + words, mask=words < num_words, other=0)
        for i in tl.static_range(4):
            if X_WORDS:
                x_i = (x_first >> (16 * i)).to(tl.int16).to(out_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
            else:
                x_i = tl.load(x_ptr + 4 * words + i, mask=words < num_words, other=0.0).to(tl.float32)
            if MAGIC:  # bytes 0 and 2 under 2^23, 1 and 3 under 2^15; the flipped sign bit adds 128
                half = packed_first if i < 2 else packed_first >> 16
                mask = tl.full(half.shape, 0xFF << (8 * (i % 2)), tl.int32)
                exponent = tl.full(half.shape, ((150 - 8 * (i % 2)) << 23) | (0x80 << (8 * (i % 2))), tl.int32)
                if INLINE_ASM:
                    bits = tl.inline_asm_elementwise(LOP3_MUX_XOR, "=r,r,r,r", [half, mask, exponent], dtype=tl.int32,
                                                     is_pure=True, pack=1)
                else:  # the interpreter runs no PTX
                    bits = (mask & (half ^ exponent)) | (~mask & exponent)
                q = bits.to(tl.float32, bitcast=True) - (2.0 ** (23 - 8 * (i % 2)) + 128.0)
            else:
                q = ((packed_first << (24 - 8 * i)) >> 24).to(tl.float32)
            acc += q * x_i[None, :]
    for k0 in range(WORDS if PRELOAD else 0, num_words, WORDS):
        word = k0 + words
        word_ok = word < num_words
        packed = tl.load(w_rows + word[None, :], mask=row_ok[:, None] & word_ok[None, :], other=0,
                         eviction_policy=EVICTION)
        if X_WORDS:
            x_words = tl.load(x_ptr + word, mask=word_ok, other=0)
        for i in tl.static_range(4):
            if X_WORDS:  # activation i of each word: its 16 bits, as the activations' type
                x_i = (x_words >> (16 * i)).to(tl.int16).to(out_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
            else:
                x_i = tl.load(x_ptr + 4 * word + i, mask=word_ok, other=0.0).to(tl.float32)
            if MAGIC:  # bytes 0 and 2 under 2^23, 1 and 3 under 2^15; the flipped sign bit adds 128
                half = packed if i < 2 else packed >> 16
                mask = tl.full(half.shape, 0xFF << (8 * (i % 2)), tl.int32)
                exponent = tl.full(half.shape, ((150 - 8 * (i % 2)) << 23) | (0x80 << (8 * (i % 2))), tl.int32)
                if INLINE_ASM:
                    bits = tl.inline_asm_elementwise(LOP3_MUX_XOR, "=r,r,r,r", [half, mask, exponent], dtype=tl.int32,
                                                     is_pure=True, pack=1)
                else:  # the interpreter runs no PTX
                    bits = (mask & (half ^ exponent)) | (~mask & exponent)
                q = bits.to(tl.float32, bitcast=True) - (2.0 ** (23 - 8 * (i % 2)) + 128.0)
            else:
                q = ((packed << (24 - 8 * i)) >> 24).to(tl.float32)  # byte i, sign-extended
            acc += q * x_i[None, :]
    if PDL:
        gdc_launch_dependents()
    y = tl.sum(acc, axis=1) * s
    if GATED:
        gate, up = tl.split(tl.reshape(y, [BLOCK_N // 2, 2]))
        y = gate * tl.sigmoid(gate) * up
        out_rows = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(out_ptr + out_rows, y.to(out_ptr.dtype.element_ty), mask=out_rows < N)


# The GEMVs' weight loads are marked evict-first: each weight line is read once per step, so it should leave L2
# before what the step reuses (activations, KV, scales). From HBM it took down_proj 25.65 -> 23.41 us on an H100
# (perf/exp_w8_gemv.py, session 15); in the 8B batch-1 step on an H100, INT8 + INT8 head 3.223 -> 3.147 ms and
# INT4 + INT8 head 2.447 -> 2.435 ms (perf/ablate_decode.py, perf/RESULTS.md session 16). "" is the default policy.
w8_weight_eviction = "evict_first"
w4_weight_eviction = "evict_first"
# The INT4 GEMV multiplies bf16 activations two nibbles per instruction (PAIRS in its kernel): INT4 + INT8 head
# 2.436 -> 2.310 ms per 8B batch-1 step on an H100 (perf/ablate_decode.py, whose w4fp32 turns it off; session 17).
w4_bf16_pairs = True
# ... and sums two words' eight bf16x2 products before converting to float32 (CHAIN), not one word's four: INT4 +
# INT8 head 2.440 -> 2.064 ms per 8B batch-1 step on an H100 (perf/ablate_decode.py's w4chain=1 turns it off;
# session 18); without it the adjacent-column layout's loop held 79 registers, with it 64. (Chains of four words,
# 48 registers, ran 2.073 ms and were removed again.)
w4_chain_words = 2
# fp16 activations take the pairs loop too, each x pair rounded to bf16x2 in registers (X_FP16): per 8B projection
# from HBM 1.4-1.8x faster than the float32 loop (qkv 10.0 -> 7.1 us, gate_up 37.8 -> 22.2 on an H200), at the bf16
# loop's error (3.8e-3 of the output's norm against 2.1e-4; perf/exp_w4_fp16.py, session 19). fp16 models (most
# AutoAWQ checkpoints) take it; False gives them the float32 loop.
w4_fp16_pairs = True
# The batch-1 INT4 GEMV through backend/kernels/w4_gemv_ring.py (weights copied trips ahead through shared memory)
# where it applies (bf16 x, groups of 128); off: the register kernel below for every shape. EXPERIMENT.
w4_gemv_ring = os.environ.get("TRITIUM_W4_RING", "0") == "1"
# The INT8 GEMV reads 16-bit activations as int64 words (X_WORDS in its kernel) and converts bytes by the exponent
# trick (MAGIC): INT8 + INT8 head 3.157 -> 3.042 ms per 8B batch-1 step with the first alone, 3.101 with the second
# alone, 2.997 with both, on an H100 (perf/ablate_decode.py, whose w8plain turns both off; session 17).
w8_x_words = True
w8_magic = True


def _register_cap(tile: dict) -> dict:
    """A tile's optional "maxnreg" (registers per thread, for occupancy) as a launch option; the interpreter
    takes none."""
    if "maxnreg" not in tile or os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    return {"maxnreg": tile["maxnreg"]}


def w8_gemv_tile(N: int, K: int, device: torch.device) -> dict:
    """1 KB of each row per chunk, 4 warps; 4 rows per program for long rows (K >= 8192, down_proj) and narrow
    products (N <= 4096, o_proj), 8 otherwise. Within 1% of the best of 32 tiles on each Llama-3-8B projection
    and the LM head on an H100, timed from HBM (perf/tune_quant_gemv.py, perf/results/h100-tune_quant_gemv-hbm.json);
    down_proj's 24.5 us beats the split-K kernel's 25.3 us plus its zero fill. The gated gate_up GEMV (4 gate and 4
    up rows per program) keeps this tile: best of 10 in place in the 8B batch-1 step (perf/ablate_decode.py
    gated8=..., perf/results/h100-ablate_decode-session10.json)."""
    return dict(BLOCK_N=4 if K >= 8192 or N <= 4096 else 8, WORDS=256, num_warps=4)


def w4_gemv_tile(N: int, K: int, group_size: int, device: torch.device) -> dict:
    """TILES row tiles of BLOCK_N rows per program over BLOCKS planar blocks: 8 tiles of 2 rows, over 16 blocks
    with 16 warps for long rows and narrow products (down_proj, o_proj), over 8 blocks with 8 warps otherwise
    (qkv, gate_up). With the bf16x2 loop these were the best of 45 tiles from HBM for qkv, gate_up and down and
    within 2% for o (perf/tune_quant_gemv.py --bits 4 on an H100, session 17,
    perf/results/h100-tune_w4_gemv-session17-pairs.json: gate_up 26.9 -> 24.9 us against session 12's 4 x 4 x 4
    x 4 tile), and in place they took int4_wo batch-1 decode 411.7 -> 415.0 tok/s in the same run. Each x pair a
    thread loads serves as many rows as the thread holds 4-word groups: TILES * BLOCK_N * BLOCKS * 16 words over
    4 * 32 * num_warps, two in both tiles here. Not re-tuned since session 18's chained loop (64 registers).
    Groups under 128 make planar blocks of the group's size, so a loop trip takes proportionally more of them
    (the same columns and x slice per trip as at 128): with 8 blocks of 32 columns an 8B batch-1 step ran at
    bf16's speed (perf/RESULTS.md, session 10)."""
    per_128 = 128 // planar_block(K, group_size)
    if K >= 8192 or N <= 4096:
        return dict(TILES=8, BLOCK_N=2, BLOCKS=16 * per_128, num_warps=16)
    return dict(TILES=8, BLOCK_N=2, BLOCKS=8 * per_128, num_warps=8)


SMALL_M = 16  # up to here: the decode (split-K) launch
MEDIUM_M = 64


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def plan_launch(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tile sizes and split-K of the W8A16 tiled kernel (and, for M > 64, scaled_matmul's) for an [M, K] x
    [K, N] product, from shapes alone (CUDA-graph safe). M <= 64 is decode-like: one row tile, K split per
    split_k. M > 64 uses 128-row tiles and never splits, so every prefill length runs the same compiled variant."""
    if M > MEDIUM_M:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, split=1, GROUP_M=8, num_warps=8, num_stages=3)
    block_m = SMALL_M if M <= SMALL_M else MEDIUM_M
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, split=split_k(M, N, K, block_m, 64, 128, device),
                GROUP_M=1, num_warps=4, num_stages=4)


def _launch(kernel, x2: torch.Tensor, N: int, K: int, plan: dict, args: tuple, extra: dict) -> torch.Tensor:
    import triton

    M = x2.shape[0]
    split = plan["split"]
    block_k = plan["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_split)
    alloc = torch.zeros if split > 1 else torch.empty
    out = alloc(M, N, dtype=x2.dtype, device=x2.device)
    if M == 0:
        return out
    grid = (triton.cdiv(M, plan["BLOCK_M"]) * triton.cdiv(N, plan["BLOCK_N"]), split)
    kernel[grid](x2, *args[:-1], out, M, N, K, k_per_split, x2.stride(0), *args[-1], out.stride(0),
                 **extra, BLOCK_M=plan["BLOCK_M"], BLOCK_N=plan["BLOCK_N"], BLOCK_K=block_k,
                 GROUP_M=plan["GROUP_M"], ATOMIC=split > 1, num_warps=plan["num_warps"],
                 num_stages=plan["num_stages"], **pdl_args(x2.device))
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# From W8_DEQUANT_MIN_M rows (prefill chunks) W8A16 dequantizes the weight to the activation dtype and calls
# cuBLAS, as W4A16 does from DEQUANT_MIN_M: the tiled kernel converts int8 tiles in its main loop and runs at
# ~250-300 TFLOP/s where cuBLAS bf16 runs at ~550-700, while the dequantize pass costs a fixed ~5 bytes of traffic
# per weight (read 1, write 2, cuBLAS reads 2). Summed over the four Llama-3-8B projections on an H100
# (perf/results/h100-bench_quant-5-kernels.json): M = 256 tiled 433 us / dequantize 453; M = 512 609 / 548;
# M = 2048 2,070 / 1,530 (bf16 1,290). Decode batches (at most 256 rows, inside CUDA graphs) stay below the
# threshold, so the dense weight is an ordinary temporary from the caching allocator, never a graph's buffer.
# Below it, from MEDIUM_M rows, narrow products dequantize too, into the shared scratch that W4A16 uses (so decode
# graphs can take it): the tiled plan's 128 x 128 tiles without split-K leave them under one program per SM
# (32 programs for N = 4096 at M = 128), and dequantize + cuBLAS measured 30-40% faster on o_proj and down_proj at
# M = 128-256, equal on qkv, while gate_up's 224+ programs keep the tiled kernel ahead (H100, session 12,
# perf/results/h100-w8-swap-session12.json).
W8_DEQUANT_MIN_M = 512
W8_PATHS = ("auto", "tiled", "dequant")


def dequantize_int8_triton(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [N, K] weight in `dtype`, into `out` when given (any [N, K] tensor with unit stride along K); same
    values as dequantize_int8(...).to(dtype). qweight: unit stride along K."""
    import triton

    N, K = qweight.shape
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(N, 32), triton.cdiv(K, 128))
    _dequantize_int8_kernel[grid](qweight, scales, out, N, K, qweight.stride(0), out.stride(0),
                                  BLOCK_N=32, BLOCK_K=128, num_warps=4)
    return out


def w8a16_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        path: str = "auto") -> torch.Tensor:
    """Same contract as w8a16_matmul_ref. path "auto": one row takes the GEMV, W8_DEQUANT_MIN_M rows or more
    dequantize + cuBLAS, from MEDIUM_M rows a product whose tiled grid is under one program per SM dequantizes
    into the shared scratch, the rest the tiled kernel ("tiled" and "dequant" force one, for tuning and tests).
    Specializations of the tiled kernel: the plan's tile constexprs (three per shape: M <= 16, <= 64, larger),
    whether K is split, dtypes. qweight must have unit stride along K."""
    if path not in W8_PATHS:
        raise ValueError(f"path must be one of {W8_PATHS}, got {path!r}")
    N, K = qweight.shape
    x2 = _rows(x)
    M = x2.shape[0]
    if path == "auto" and M == 1 and K % 4 == 0 and qweight.is_contiguous():
        return w8a16_gemv_triton(x2, qweight, scales).view(*x.shape[:-1], N)
    if path == "dequant" or (path == "auto" and M >= W8_DEQUANT_MIN_M and not _capturing(x.device)):
        weight = dequantize_int8_triton(qweight, scales, x2.dtype)
        return torch.nn.functional.linear(x2, weight).view(*x.shape[:-1], N)
    plan = plan_launch(M, N, K, x.device)
    if path == "auto" and _narrow_grid(M, N, plan, x.device):
        out = _scratch_matmul(x2, N, K, lambda dense: dequantize_int8_triton(qweight, scales, x2.dtype, out=dense))
        if out is not None:
            return out.view(*x.shape[:-1], N)
    out = _launch(_w8a16_kernel, x2, N, K, plan, (qweight, scales, (qweight.stride(0),)), {})
    return out.view(*x.shape[:-1], N)


# ---- W4A16 for M > 1 ------------------------------------------------------------------------------------------
# Three paths: the batch-1 GEMV above; for 1 < M < DEQUANT_MIN_M the join kernel, which dequantizes tiles in
# registers; from DEQUANT_MIN_M rows on (and from MEDIUM_M rows for products too narrow to fill the GPU with join
# tiles: w4_takes_dequant), the whole weight is dequantized into a reused scratch buffer (decode buckets of 96-256
# rows run inside CUDA graphs, so unlike W8A16's large-M path it cannot be a temporary) and multiplied by cuBLAS. That last one is vLLM's AWQ choice for large batches (vllm/model_executor/layers/quantization/awq.py,
# AWQLinearMethod.apply: awq_dequantize then torch.matmul from 256 tokens on).
#
# Why 128: the dequantize pass costs a fixed ~4.5 bytes of traffic per weight (read 0.5, write 2, cuBLAS reads 2
# back), ~170 us for gate_up (28672 x 4096) on an H100 whatever M is, while a tiled kernel dequantizes every weight
# tile once per row tile and its main loop is slower than cuBLAS's. Measured on an H100 (perf/tune_w4_matmul.py,
# perf/results/h100-tune_w4_matmul.json): at M = 128 dequantize + cuBLAS beats the best join plan on qkv, o and
# down (50.8 vs 77.4 us for qkv) and ties on gate_up; at M = 256 it is 1.8-2.1x faster (decode buckets 128..256 of
# backend/engine/cuda_graphs.py fall on this side, see _DequantScratch).
DEQUANT_MIN_M = 128

# Join-kernel tiles per row bucket (largest M of the bucket -> tile); the K tile is the planar block and split-K is
# derived per shape in w4_join_plan.
# perf/tune_w4_matmul.py prints the plan with the lowest mean cost over the 8B projections per M in this form
# (within 1-12% of each shape's best, perf/results/h100-tune_w4_matmul.json).
# All take the weight as the dot's first operand (SWAP_AB): at M = 64 1.30-1.38x faster per 8B projection than the
# best plans without it, at M = 2-16 0.96-1.23x (H100, CUDA graphs, best of 36 plans per shape and M, session 12:
# perf/results/h100-w4-join-swap-session12.json).
W4_JOIN_TILES = {
    SMALL_M: dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, SWAP_AB=True),
    MEDIUM_M: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, SWAP_AB=True),
    DEQUANT_MIN_M - 1: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, SWAP_AB=True),
}


def split_k(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Programs per output tile along K: enough for about two programs per SM, but at least 8 K tiles each (fewer
    leaves the load pipeline mostly prologue). Large M never splits: its output tiles already fill the GPU."""
    if M > MEDIUM_M:
        return 1
    tiles = -(-M // block_m) * -(-N // block_n)
    return max(1, min(-(-2 * _num_sms(device) // tiles), -(-K // block_k) // 8))


def w4_join_plan(M: int, N: int, K: int, group_size: int, device: torch.device) -> dict:
    """The join kernel's launch for an [M, K] x [K, N] product: W4_JOIN_TILES' tile for M's bucket (the last one
    beyond it), the K tile capped by the group, split-K per split_k. Depends on shapes only (CUDA-graph safe)."""
    bucket = next((top for top in sorted(W4_JOIN_TILES) if M <= top), max(W4_JOIN_TILES))
    tile = dict(W4_JOIN_TILES[bucket])
    tile["BLOCK_K"] = planar_block(K, group_size)
    split = split_k(M, N, K, tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"], device)
    return dict(tile, split=split, GROUP_M=8)


class _DequantScratch:
    """One dense weight buffer per (device, dtype), grown to the largest weight seen and shared by every layer.

    Sharing is safe because the layers run one after another on one stream: a layer's cuBLAS product has read the
    buffer before the next layer's dequantize kernel overwrites it (work queued on one stream runs in order).

    CUDA graphs (backend/engine/cuda_graphs.py captures decode batches up to 256, so buckets >= DEQUANT_MIN_M, and
    narrow W4A16 and W8A16 products from MEDIUM_M rows, take this path inside a graph): a captured graph bakes in the
    buffer's address, so
      - nothing is allocated during a capture (it would come from the graph's private pool, and its address would
        be handed out again once the graph's tensors are freed): take() returns None and the caller runs the tiled
        kernel instead, which is correct, only slower. The engine never hits this: quantization.layers.warmup runs
        every layer at 256 rows, and DecodeGraphs runs each bucket eagerly, before any capture.
      - a buffer that was used in a capture is never freed when a larger one replaces it (the graph still writes
        to it on replay), so it is kept in `_kept_for_graphs` for the life of the process.
    Not safe across streams that run concurrently (two threads' forwards would race on the buffer)."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._captured: set[tuple] = set()
        self._kept_for_graphs: list[torch.Tensor] = []

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        key = (device, dtype)
        buffer = self._buffers.get(key)
        capturing = _capturing(device)
        if buffer is None or buffer.numel() < numel:
            if capturing:
                return None
            if buffer is not None and key in self._captured:
                self._kept_for_graphs.append(buffer)
            self._captured.discard(key)
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        if capturing:
            self._captured.add(key)
        return buffer[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in [*self._buffers.values(), *self._kept_for_graphs])


_DEQUANT_SCRATCH = _DequantScratch()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _shared_strides(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The INT4 kernels index scales and zeros with one row stride: contiguous copies when theirs differ."""
    if scales.stride() != zeros.stride():
        return scales.contiguous(), zeros.contiguous()
    return scales, zeros


def dequantize_int4_triton(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, K: int,
                           dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [N, K] weight in `dtype` from group-planar words ((q - z) * s computed in fp32, rounded once), into
    `out` when given (any [N, K] tensor with unit stride along K). Same values as dequantize_int4(...).to(dtype)."""
    import triton

    N = words.shape[0]
    check_group_size(K, group_size)
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=words.device)
    scales, zeros = _shared_strides(scales, zeros)
    block_n, block_k = 32, planar_block(K, group_size)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequantize_int4_kernel[grid](words, scales, zeros, out, N, K, words.stride(0), scales.stride(0),
                                  out.stride(0), GROUP_SIZE=group_size, BLOCK_N=block_n, BLOCK_K=block_k,
                                  num_warps=4)
    return out


def _narrow_grid(M: int, N: int, plan: dict, device: torch.device) -> bool:
    """Beyond MEDIUM_M rows (no split-K there), a tiled plan with under one program per SM: the W8A16 and W4A16
    products that dequantize into the shared scratch instead (see W8_DEQUANT_MIN_M and w4_takes_dequant)."""
    programs = -(-M // plan["BLOCK_M"]) * -(-N // plan["BLOCK_N"]) * plan["split"]
    return M > MEDIUM_M and programs < _num_sms(device)


def _scratch_matmul(x2: torch.Tensor, N: int, K: int, dequantize_into: Callable) -> torch.Tensor | None:
    """dequantize_into(out [N, K]) fills the shared scratch with the dense weight, then cuBLAS; None when no
    scratch can be had (inside a CUDA-graph capture that needs a larger buffer than exists)."""
    scratch = _DEQUANT_SCRATCH.take(N * K, x2.dtype, x2.device)
    if scratch is None:
        return None
    return torch.nn.functional.linear(x2, dequantize_into(scratch.view(N, K)))


def _w4a16_dequant_matmul(x2, words, scales, zeros, group_size: int) -> torch.Tensor | None:
    N, K = words.shape[0], x2.shape[1]
    return _scratch_matmul(x2, N, K, lambda out: dequantize_int4_triton(words, scales, zeros, group_size, K,
                                                                        x2.dtype, out=out))


def _w4a16_tiled(x2, words, scales, zeros, group_size: int, plan: dict) -> torch.Tensor:
    N, K = words.shape[0], x2.shape[1]
    if plan["BLOCK_K"] != planar_block(K, group_size):
        raise ValueError(f"BLOCK_K {plan['BLOCK_K']} must be the planar block of K {K} and group {group_size}: "
                         f"{planar_block(K, group_size)}")
    scales, zeros = _shared_strides(scales, zeros)
    args = (words, scales, zeros, (words.stride(0), scales.stride(0)))
    return _launch(_w4a16_join_kernel, x2, N, K, plan, args,
                   dict(GROUP_SIZE=group_size, SWAP_AB=plan.get("SWAP_AB", False),
                        INLINE_ASM=os.environ.get("TRITON_INTERPRET") != "1"))


W4_PATHS = ("auto", "join", "dequant")


def _check_planar(words: torch.Tensor, K: int, group_size: int) -> None:
    block = planar_block(K, group_size)
    want = -(-K // block) * block // 8
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] != want or words.stride(1) != 1:
        raise ValueError(f"INT4 kernels take group-planar int32 words [N, {want}] for K {K} and group {group_size} "
                         f"(to_planar_int4); got {words.dtype} {tuple(words.shape)}")


def w4_takes_dequant(M: int, N: int, K: int, group_size: int, device: torch.device, plan: dict | None = None) -> bool:
    """From DEQUANT_MIN_M rows; and from MEDIUM_M rows when the join kernel's grid (no split-K there) is under one
    program per SM, as for W8A16's narrow products. At M = 128 the join kernel took 41.9 / 170.8 us on o / down
    (64 programs) against 30.6 / 118.8 dequantized, 42.7 against 48.4 on qkv (96 programs) and 126.2 against 218.2 on
    gate_up (H100, perf/results/h100-tune_w4_matmul-session12-swap.json)."""
    return M >= DEQUANT_MIN_M or _narrow_grid(M, N, plan or w4_join_plan(M, N, K, group_size, device), device)


def w4a16_matmul_triton(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int, path: str = "auto", plan: dict | None = None) -> torch.Tensor:
    """w4a16_matmul_ref's product with the weight as group-planar words (to_planar_int4 of its qweight).
    group_size: a power of two >= 32, or K itself.

    path "auto": one row takes the GEMV, dequantize + cuBLAS where w4_takes_dequant says, the rest the join kernel. "join"
    and "dequant" force one path (for tuning and tests); `plan` overrides the join kernel's launch (w4_join_plan's
    keys), and a plan's BLOCK_K must be the planar block (planar_block)."""
    if path not in W4_PATHS:
        raise ValueError(f"path must be one of {W4_PATHS}, got {path!r}")
    N, K = words.shape[0], x.shape[-1]
    check_group_size(K, group_size)
    x2 = _rows(x)
    M = x2.shape[0]
    if path == "auto" and M == 1:  # the GEMV checks the words itself
        return w4a16_gemv_triton(x2, words, scales, zeros, group_size).view(*x.shape[:-1], N)
    _check_planar(words, K, group_size)
    plan = plan or w4_join_plan(M, N, K, group_size, x2.device)
    out = None
    if path == "dequant" or (path == "auto" and w4_takes_dequant(M, N, K, group_size, x2.device, plan)):
        out = _w4a16_dequant_matmul(x2, words, scales, zeros, group_size)
    if out is None:
        out = _w4a16_tiled(x2, words, scales, zeros, group_size, plan)
    return out.view(*x.shape[:-1], N)


def w8a16_gemv_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      tile: dict | None = None, gated: bool = False) -> torch.Tensor:
    """x [1, K] -> [1, N]; same contract as w8a16_matmul_ref for one row. K must be a multiple of 4 (whole int32
    words per row); `tile` overrides w8_gemv_tile (for tuning). gated: the weight is [gate; up] and the result
    [1, N / 2] is SiLU-and-mul of the product (activation.py's function, in the epilogue)."""
    import triton

    N, K = qweight.shape
    if x.shape != (1, K) or K % 4 or not qweight.is_contiguous() or (gated and N % 2):
        raise ValueError(f"w8a16_gemv_triton needs x [1, {K}], K a multiple of 4 and a contiguous qweight (an even "
                         f"number of rows when gated); got x {tuple(x.shape)}, weight {tuple(qweight.shape)}")
    words = qweight.view(torch.int32)
    n_out = N // 2 if gated else N
    out = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    tile = tile or w8_gemv_tile(N, K, x.device)
    x = x.contiguous()
    x_words = w8_x_words and x.element_size() == 2 and x.data_ptr() % 8 == 0
    _w8a16_gemv_kernel[(triton.cdiv(n_out, tile["BLOCK_N"] // 2 if gated else tile["BLOCK_N"]),)](
        x.view(torch.int64) if x_words else x, words, scales, out, n_out, K, words.stride(0), BLOCK_N=tile["BLOCK_N"],
        WORDS=tile["WORDS"], PRELOAD=_pdl.preload_first_tile, GATED=gated, EVICTION=w8_weight_eviction,
        X_WORDS=x_words, MAGIC=w8_magic, INLINE_ASM=os.environ.get("TRITON_INTERPRET") != "1",
        num_warps=tile["num_warps"], **_register_cap(tile), **pdl_args(x.device))
    return out


def w4a16_gemv_triton(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, tile: dict | None = None, gated: bool = False) -> torch.Tensor:
    """x [1, K] -> [1, N] over group-planar words; `tile` overrides w4_gemv_tile (for tuning; an optional
    "maxnreg" caps the registers per thread). gated: the weight is [gate; up] and the result [1, N / 2] is
    SiLU-and-mul of the product."""
    import triton

    N, K = words.shape[0], x.shape[-1]
    _check_planar(words, K, group_size)
    if x.shape != (1, K) or (gated and N % 2):
        raise ValueError(f"w4a16_gemv_triton needs x [1, K] (and an even number of rows when gated); got x "
                         f"{tuple(x.shape)}, {N} rows")
    scales, zeros = _shared_strides(scales, zeros)
    if w4_gemv_ring and tile is None and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        from backend.kernels import w4_gemv_ring as ring
        if ring.takes(x, N, K, group_size, gated):
            return ring.w4a16_gemv_ring(x, words, scales, zeros, gated=gated)
    n_out = N // 2 if gated else N
    out = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    tile = tile or w4_gemv_tile(N, K, group_size, x.device)
    if gated and tile["TILES"] % 2:
        raise ValueError(f"the gated INT4 GEMV pairs gate and up tiles: TILES must be even, got {tile['TILES']}")
    block_k = planar_block(K, group_size)
    num_blocks = triton.cdiv(K, block_k)
    rows_per_program = tile["TILES"] * tile["BLOCK_N"] // (2 if gated else 1)
    x_fp16 = x.dtype == torch.float16
    pairs = w4_bf16_pairs and (x.dtype == torch.bfloat16 or (w4_fp16_pairs and x_fp16))
    inline_asm = os.environ.get("TRITON_INTERPRET") != "1"
    x = x.contiguous()
    if pairs:  # the kernel reads x as int32 words, one column pair each
        x = (x if x.data_ptr() % 4 == 0 else x.clone()).view(torch.int32)
    _w4a16_gemv_kernel[(triton.cdiv(n_out, rows_per_program),)](
        x, words, scales, zeros, out, n_out, K, num_blocks, words.stride(0), scales.stride(0),
        GROUP_SIZE=group_size, BLOCK_K=block_k, TILES=tile["TILES"], BLOCK_N=tile["BLOCK_N"], BLOCKS=tile["BLOCKS"],
        EVEN_K=K % block_k == 0 and num_blocks % tile["BLOCKS"] == 0,
        INLINE_ASM=inline_asm, GATED=gated, EVICTION=w4_weight_eviction, PAIRS=pairs,
        CHAIN=w4_chain_words if pairs and inline_asm else 1, X_FP16=pairs and x_fp16,
        PRELOAD=_pdl.preload_first_tile,
        num_warps=tile["num_warps"], **_register_cap(tile), **pdl_args(x.device))
    return out


def check_group_size(K: int, group_size: int) -> None:
    """A K tile must never straddle two groups (the kernel reads one scale per tile): tiles are powers of two
    up to 128 starting at multiples of themselves, so the group must be one too (or cover all of K)."""
    if K % 2:
        raise ValueError(f"INT4 weights need an even number of input columns, got {K}")
    if group_size != K and (group_size < 32 or group_size & (group_size - 1)):
        raise ValueError(f"group_size {group_size} must be K ({K}) or a power of two >= 32")
