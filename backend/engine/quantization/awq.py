"""AWQ (Lin et al., 2023): activation-aware scaling before INT4 rounding. Input channels that see large
activations are scaled up in the weight (and the activation divided by the same factor, folded into the
previous RMSNorm or projection), so their weights lose less to rounding; the exponent of the scale is searched
on calibration activations. Then each group's clipping range is searched the same way.

Written from the paper and the shape of AutoAWQ's search (a 20-point grid over s = x_mean^r / w_mean^(1-r),
normalized; clipping ratios 1.0 down to 0.5), with the loss on the projection's own output.

The scale search looks at 1024 calibration rows (it was 256: on SmolLM2-135M a search on so few tokens picked
scales that did not carry over to held-out text; 1024 rows and 16 windows of calibration took the perplexity
change from +20.7% to +15.6%, see perf/RESULTS.md). AutoAWQ searches on all its 128 x 512 tokens.
"""
from __future__ import annotations

import torch

from . import rtn

GRID = 20
CLIP_STEPS = 10  # shrink ratios 1.0, 0.95, ..., 0.55


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


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, group_size: int, max_rows: int = 128,
                row_chunk: int = 1024) -> torch.Tensor:
    """Per-(row, group) shrink ratio [N, G'] of the quantization range minimizing each group's output error."""
    x = rtn.group_view(_sample_rows(x.float(), max_rows), group_size).transpose(0, 1)  # [G', T, g]
    clips = []
    for r0 in range(0, w.shape[0], row_chunk):
        wc = w[r0:r0 + row_chunk].float()
        wg = rtn.group_view(wc, group_size).transpose(0, 1)  # [G', n, g]
        want = torch.bmm(x, wg.transpose(1, 2))  # [G', T, n]: each group's share of the output
        best = torch.full(wg.shape[:2], float("inf"), device=w.device)
        best_clip = torch.ones_like(best)
        for step in range(CLIP_STEPS):
            ratio = 1.0 - step / (2 * CLIP_STEPS)
            clip = torch.full(best.shape, ratio, device=w.device)
            deq = rtn.group_view(rtn.fake_quantize_int4(wc, group_size, clip.T), group_size).transpose(0, 1)
            err = (torch.bmm(x, deq.transpose(1, 2)) - want).pow(2).mean(1)  # [G', n]
            better = err < best
            best = torch.where(better, err, best)
            best_clip = torch.where(better, clip, best_clip)
        clips.append(best_clip.T)
    return torch.cat(clips)
