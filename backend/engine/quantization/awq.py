"""AWQ (Lin et al., 2023): activation-aware scaling before INT4 rounding. Input channels that see large
activations are scaled up in the weight (and the activation divided by the same factor, folded into the
previous RMSNorm or projection), so their weights lose less to rounding; the exponent of the scale is searched
on calibration activations. The scaled weights are then rounded by GPTQ (calibrated._awq_layer): its static
groups' range search replaces AWQ's clipping search, which this module had until session 5 (perf/RESULTS.md).

Written from the paper and the shape of AutoAWQ's search (a 20-point grid over s = x_mean^r / w_mean^(1-r),
normalized), with the loss on the projection's own output.

The scale search looks at 1024 calibration rows (it was 256: on SmolLM2-135M a search on so few tokens picked
scales that did not carry over to held-out text; 1024 rows and 16 windows of calibration took the perplexity
change from +20.7% to +15.6%, see perf/RESULTS.md). AutoAWQ searches on all its 128 x 512 tokens.
"""
from __future__ import annotations

import torch

from . import rtn

GRID = 20


def _sample_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    if x.shape[0] <= max_rows:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).long()
    return x[idx]


def _w_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of |w| normalized by its group's max: how large each input column is, relatively."""
    g = rtn.group_view(w.abs(), group_size)
    g = g / g.amax(dim=2, keepdim=True).clamp(min=1e-8)
    return g.flatten(1)[:, : w.shape[1]].mean(0)


@torch.no_grad()
def search_scale(x: torch.Tensor, w: torch.Tensor, group_size: int, max_rows: int = 1024) -> torch.Tensor:
    """The per-input-channel scale s [K] minimizing ||x W^T - (x / s) Q(W s)^T||^2 over the grid."""
    x = _sample_rows(x.float(), max_rows)
    w = w.float()
    x_mean = x.abs().mean(0)
    w_mean = _w_mean(w, group_size)
    want = x @ w.T
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for step in range(GRID):
        r = step / GRID
        s = (x_mean.pow(r) / w_mean.pow(1 - r).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = rtn.fake_quantize_int4(w * s, group_size) / s
        loss = float((x @ wq.T - want).pow(2).mean())
        if loss < best:
            best, best_s = loss, s
    return best_s
