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


# ---- Triton kernel ------------------------------------------------------------------------------------------
try:
    import triton.language as tl
except ImportError:  # triton is optional on CPU: the reference above needs only torch
    tl = None

from backend.kernels._jit import lazy_jit


@lazy_jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, x_stride, res_stride, out_stride, sum_stride,
                     hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # One row per program, one pass: the row (<= 16K elements) stays in registers between the sum of
    # squares and the scaling, so x and residual are read once and the two outputs written once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype first, as the reference (and the next layer) sees it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * sum_stride + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (x32 * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


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
    import triton

    hidden = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty_like(x) if out is None else out
    out2 = out.view(-1, hidden)
    res2 = _rows(residual) if residual is not None else x2
    summed = torch.empty_like(x) if residual is not None else x
    sum2 = summed.view(-1, hidden)
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out2, sum2, x2.stride(0), res2.stride(0),
                                         out2.stride(0), sum2.stride(0), hidden, eps,
                                         HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps)
    return out, summed
