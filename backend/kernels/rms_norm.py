"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual) * weight, x + residual); with no residual, the sum is x itself.

    Computed in float32 and cast back, as Llama's reference implementation does.
    """
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype), x


def rms_norm_quant_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                       kind: str) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((codes, per-token scales), x + residual): the normalized rows quantized for a W8A8 product (kind "int8"
    or "fp8", as scaled_matmul.quantize_per_token_ref), from the float32 norm before any rounding to x's dtype."""
    from backend.kernels.scaled_matmul import quantize_per_token_ref

    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    rows = normed.reshape(-1, normed.shape[-1])
    return quantize_per_token_ref(rows, kind), x


# ---- Triton kernel ------------------------------------------------------------------------------------------
try:
    import triton.language as tl

    from backend.kernels._pdl import gdc_launch_dependents, gdc_wait
except ImportError:  # triton is optional on CPU: the reference above needs only torch
    tl = None

from backend.kernels._jit import lazy_jit
from backend.kernels._pdl import pdl_args


@lazy_jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, scale_ptr, x_stride, res_stride, out_stride,
                     sum_stride, hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     QUANT: tl.constexpr, QMAX: tl.constexpr, IS_INT8: tl.constexpr, PDL: tl.constexpr):
    # One row per program, one pass: the row (<= 16K elements) stays in registers between the sum of
    # squares and the scaling, so x and residual are read once and the two outputs written once.
    # QUANT: the output is the row quantized for the W8A8 product that reads it (codes and a per-token scale,
    # as scaled_matmul's per-token quantizer computes them), which saves that quantizer's launch and a pass.
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    # The weight is written by no kernel, so it may load before the PDL wait: at batch 1 it comes from HBM
    # (the step's 15 GB of weights evict it from L2) while x, just written, comes from L2.
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if PDL:  # see _pdl.py: the next kernel may launch now; nothing a kernel writes is read before the wait
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype first, as the reference (and the next layer) sees it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * sum_stride + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    y = x32 * rstd * w
    if QUANT:
        scale = tl.maximum(tl.max(tl.abs(y), axis=0) / QMAX, 1e-10)
        tl.store(scale_ptr + row, scale)
        y = y / scale
        if IS_INT8:  # round half away from zero, like scaled_matmul's quantizer
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] as a 2-D view with unit stride along H (copies only if no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None, *,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as rms_norm_ref. The sum x + residual is a new tensor (inputs are never written).

    Specializations: BLOCK = next power of two >= hidden, HAS_RESIDUAL, and the dtypes.
    """
    out = torch.empty_like(x) if out is None else out
    return out, _launch(x, weight, eps, residual, out.view(-1, x.shape[-1]), None, None)


def rms_norm_quant_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                          kind: str) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Same contract as rms_norm_quant_ref (codes [T, H], float32 scales [T]). Specializations: as
    rms_norm_triton, plus the code dtype."""
    from backend.kernels.scaled_matmul import FP8_MAX, INT8_MAX

    rows = x.reshape(-1, x.shape[-1]).shape[0]
    codes = torch.empty(rows, x.shape[-1], dtype=torch.int8 if kind == "int8" else torch.float8_e4m3fn,
                        device=x.device)
    scales = torch.empty(rows, dtype=torch.float32, device=x.device)
    summed = _launch(x, weight, eps, residual, codes, scales, INT8_MAX if kind == "int8" else FP8_MAX)
    return (codes, scales), summed


def _launch(x, weight, eps, residual, out2, scales, qmax) -> torch.Tensor:
    """Runs the kernel into out2 (and scales when quantizing); returns x + residual (x without a residual)."""
    import triton

    hidden = x.shape[-1]
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else x2
    summed = torch.empty_like(x) if residual is not None else x
    sum2 = summed.view(-1, hidden)
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out2, sum2, out2 if scales is None else scales,
                                         x2.stride(0), res2.stride(0), out2.stride(0), sum2.stride(0), hidden, eps,
                                         HAS_RESIDUAL=residual is not None, BLOCK=block, QUANT=scales is not None,
                                         QMAX=qmax or 1.0, IS_INT8=out2.dtype == torch.int8, num_warps=num_warps,
                                         **pdl_args(x.device))
    return summed
