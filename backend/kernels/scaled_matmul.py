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
