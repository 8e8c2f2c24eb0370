"""Round-to-nearest quantizers: a float weight [N, K] -> integer (or fp8) codes and scales.

Scales are rounded to float16 *before* the codes are computed, so the codes are exact for the scales that
are stored (checkpoints keep float16 scales: 2 bytes per 128 weights for INT4 instead of 4).
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127
INT4_MAX = 15
_MIN_SCALE = 1e-6  # above float16's smallest subnormal: an all-zero row gets a finite scale


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=_MIN_SCALE).half().float()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: (codes int8 [N, K] in -127..127, scales float32 [N])."""
    w = weight.float()
    scales = _fp16_scale(w.abs().amax(dim=1) / INT8_MAX)
    q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def int4_params(w_max: torch.Tensor, w_min: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero point for groups spanning [w_min, w_max] (0 is always representable)."""
    w_max, w_min = w_max.clamp(min=0), w_min.clamp(max=0)
    scales = _fp16_scale((w_max - w_min) / INT4_MAX)
    zeros = torch.round(-w_min / scales).clamp(0, INT4_MAX)
    return scales, zeros


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of w for broadcastable per-element scales and zeros."""
    return torch.round(w / scales + zeros).clamp(0, INT4_MAX)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise: (codes uint8 [N, K] in 0..15, scales float32 [N, G'], zeros uint8 [N, G']) with
    G' = ceil(K / group_size): when the group does not divide K (SmolLM2's 576 = 4.5 x 128) the last group is
    shorter.
    """
    N, K = weight.shape
    g = group_view(weight.float(), group_size)  # zero padding: 0 is inside every group's range anyway
    w_max, w_min = g.amax(dim=2), g.amin(dim=2)
    scales, zeros = int4_params(w_max, w_min)
    q = int4_codes(g, scales[..., None], zeros[..., None])
    return q.flatten(1)[:, :K].to(torch.uint8), scales, zeros.to(torch.uint8)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, ceil(K / G), G], zero-padded at the end."""
    N, K = w.shape
    pad = -K % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(N, -1, group_size)


def dequantize_int4_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    K = q.shape[1]
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :K]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :K]
    return (q.float() - z) * s


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dequantized INT4 weight in float32 (what the quantized layer computes with); AWQ's scale search calls
    this for every grid point, so it works on the grouped view without materializing codes."""
    K = weight.shape[1]
    g = group_view(weight.float(), group_size)
    w_max, w_min = g.amax(dim=2), g.amin(dim=2)
    scales, zeros = int4_params(w_max, w_min)
    scales, zeros = scales[..., None], zeros[..., None]
    deq = (torch.round(g / scales + zeros).clamp_(0, INT4_MAX) - zeros) * scales
    return deq.flatten(1)[:, :K]


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 per output channel: (float8_e4m3fn [N, K], float32 scales [N]) with w ~ q * s."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales
