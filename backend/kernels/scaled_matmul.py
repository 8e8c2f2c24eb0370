"""W8A8 matrix products: activations quantized per token at run time (INT8 or FP8 e4m3), weights quantized
per output channel offline; an integer (or fp8) tensor-core product with both scales applied in the epilogue:

    y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n]
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0
INT8_MAX = 127.0
KINDS = ("int8", "fp8")


def quantize_per_token_ref(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes [M, K] int8 or float8_e4m3fn, float32 scales [M])."""
    xf = x.float()
    qmax = INT8_MAX if kind == "int8" else FP8_MAX
    scales = (xf.abs().amax(dim=-1) / qmax).clamp(min=1e-10)
    scaled = xf / scales[:, None]
    if kind == "int8":
        return torch.round(scaled).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scales
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def scaled_matmul_ref(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """The dequantize-then-matmul reference: float32 products of the codes, then both scales."""
    acc = xq.float() @ wq.float().T
    return (acc * x_scale.float()[:, None] * w_scale.float()[None, :]).to(out_dtype)


def w8a8_linear_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, kind: str) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: quantize x per token, then the scaled product."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_per_token_ref(x2, kind)
    return scaled_matmul_ref(xq, xs, wq, w_scale, x.dtype).view(*x.shape[:-1], wq.shape[0])


# ---- Triton kernels -----------------------------------------------------------------------------------------
# Two launches per product: a per-token quantizer (one program per row: its absmax, then the codes), and the
# tensor-core product, tiled and split like the weight-only kernels (quant_matmul.plan_launch): int8 x int8
# accumulates in int32, e4m3 x e4m3 in float32, and both scales multiply the tile in the epilogue.
try:
    import triton.language as tl

    from backend.kernels._pdl import gdc_launch_dependents, gdc_wait
except ImportError:  # triton is optional on CPU: the references above need only torch
    tl = None

from backend.kernels._jit import lazy_jit
from backend.kernels._pdl import pdl_args
from backend.kernels.quant_matmul import MEDIUM_M, SMALL_M, _num_sms, plan_launch


@lazy_jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, sx_m, sq_m, QMAX: tl.constexpr, IS_INT8: tl.constexpr,
                            BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # see _pdl.py: the next kernel may launch now; nothing here is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * sx_m + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / QMAX, 1e-10)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_ptr + row * sx_m + k0 + cols, mask=mask, other=0.0).to(tl.float32) / scale
        if IS_INT8:
            # round half away from zero; the reference rounds half to even: they differ only on exact ties
            x = tl.where(x >= 0, tl.floor(x + 0.5), tl.ceil(x - 0.5))
        x = tl.minimum(tl.maximum(x, -QMAX), QMAX)
        tl.store(q_ptr + row * sq_m + k0 + cols, x.to(q_ptr.dtype.element_ty), mask=mask)


@lazy_jit(do_not_specialize=["M"])
def _scaled_mm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, out_ptr, M, N, K, k_per_split, sx_m, sw_n, so_m,
                      IS_INT8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # see _pdl.py
        gdc_wait()
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
    if IS_INT8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        km = k < k_end
        x = tl.load(x_rows + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=km[:, None] & nm[None, :], other=0.0)
        if IS_INT8:
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        else:  # accumulated inside the MMA, like cuBLAS's FP8 fast accumulation: Hopper's FP8 MMA keeps ~14 bits
            # of mantissa (DeepSeek-V3 report, sec. 3.3.2), which put 10 of 2M outputs up to 1.2% off at K 4096
            # on an H100. Promoting to fp32 every K tile fixed that but cost 42% at M = 256 (gate_up 69.9 ->
            # 99.1 us); against e4m3's own ~3% rounding of every activation, the speed is the better trade.
            acc = tl.dot(x, w, acc)
    if PDL:
        gdc_launch_dependents()
    xs = tl.load(xs_ptr + rm, mask=mm, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=nm, other=0.0)
    out = (acc.to(tl.float32) * xs[:, None] * ws[None, :]).to(out_ptr.dtype.element_ty)
    dst = out_ptr + rm.to(tl.int64)[:, None] * so_m + rn[None, :]
    if ATOMIC:
        tl.atomic_add(dst, out, mask=mm[:, None] & nm[None, :], sem="relaxed")
    else:
        tl.store(dst, out, mask=mm[:, None] & nm[None, :])


def quantize_per_token_triton(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as quantize_per_token_ref for x [M, K] with unit stride along K."""
    import triton

    M, K = x.shape
    dtype = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    q = torch.empty(M, K, dtype=dtype, device=x.device)
    scales = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        block = min(2048, triton.next_power_of_2(K))
        _per_token_quant_kernel[(M,)](x, q, scales, K, x.stride(0), q.stride(0),
                                      QMAX=INT8_MAX if kind == "int8" else FP8_MAX, IS_INT8=kind == "int8",
                                      BLOCK=block, num_warps=4, **pdl_args(x.device))
    return q, scales


def scaled_mm_plan(M: int, N: int, K: int, device: torch.device) -> dict:
    """Large batches: the weight-only kernels' plan (quant_matmul.plan_launch) with 128 bytes of K per row (as 64
    for bf16). Decode batches (M <= 64): 64 columns x 256 bytes of K per tile, 4 warps, 3 stages, and split-K
    for about two programs per SM at M <= 16 and one at M <= 64 (bigger row tiles cost more to re-read x and
    to zero and sum the split outputs). Chosen from 72 plans per Llama-3-8B projection at M = 16 and 64 on an
    H100 (perf/tune_scaled_mm.py): 2-5% from the best of each shape, where the weight-only plan was 2-21% off."""
    if M > 64:
        return dict(plan_launch(M, N, K, device), BLOCK_K=128, num_stages=3)
    block_n, block_k = 64, 256
    n_tiles, k_tiles, sms = -(-N // block_n), -(-K // block_k), _num_sms(device)
    split = min(-(-2 * sms // n_tiles), k_tiles // 4) if M <= SMALL_M else min(sms // n_tiles, k_tiles // 8)
    return dict(BLOCK_M=SMALL_M if M <= SMALL_M else MEDIUM_M, BLOCK_N=block_n, BLOCK_K=block_k, split=max(1, split),
                GROUP_M=1, num_warps=4, num_stages=3)


def scaled_matmul_triton(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                         out_dtype: torch.dtype, plan: dict | None = None) -> torch.Tensor:
    """Same contract as scaled_matmul_ref. Specializations: the launch plan (M <= 16, <= 64, larger; split or
    not), int8 or fp8 codes, the output dtype. `plan` overrides scaled_mm_plan (for tuning)."""
    import triton

    M, K = xq.shape
    N = wq.shape[0]
    plan = plan or scaled_mm_plan(M, N, K, xq.device)
    k_per_split = triton.cdiv(triton.cdiv(K, plan["split"]), plan["BLOCK_K"]) * plan["BLOCK_K"]
    split = triton.cdiv(K, k_per_split)
    out = (torch.zeros if split > 1 else torch.empty)(M, N, dtype=out_dtype, device=xq.device)
    if M == 0:
        return out
    grid = (triton.cdiv(M, plan["BLOCK_M"]) * triton.cdiv(N, plan["BLOCK_N"]), split)
    _scaled_mm_kernel[grid](xq, wq, x_scale, w_scale, out, M, N, K, k_per_split, xq.stride(0), wq.stride(0),
                            out.stride(0), IS_INT8=xq.dtype == torch.int8, BLOCK_M=plan["BLOCK_M"],
                            BLOCK_N=plan["BLOCK_N"], BLOCK_K=plan["BLOCK_K"], GROUP_M=plan["GROUP_M"],
                            ATOMIC=split > 1, num_warps=plan["num_warps"], num_stages=plan["num_stages"],
                            **pdl_args(xq.device))
    return out


def w8a8_linear_triton(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, kind: str) -> torch.Tensor:
    """Same contract as w8a8_linear_ref."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xq, xs = quantize_per_token_triton(x2, kind)
    return scaled_matmul_triton(xq, xs, wq, w_scale, x.dtype).view(*x.shape[:-1], wq.shape[0])
