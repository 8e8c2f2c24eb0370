"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time and spread each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's
calibration inputs, so the layer's *output* error is minimized rather than the weight error.

Written from the paper's algorithm (blocks of 128 columns with lazy updates, Cholesky form of H^-1, 1% damping).
Optional act-order (columns in order of decreasing H diagonal) uses static groups: each group's scale and zero
point come from the original weights before any update, so the groups stay contiguous in the checkpoint and
the kernels need no per-column group index.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from . import rtn


class HessianAccumulator:
    """Running H = 2 / n * sum x x^T over calibration rows of one layer input."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        n = x.shape[0]
        self.H *= self.rows / (self.rows + n)
        self.rows += n
        x = x * (2.0 / self.rows) ** 0.5
        self.H += x.T @ x


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.clone()
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq_quantize_int4(weight: torch.Tensor, H: torch.Tensor, group_size: int, block_size: int = 128,
                       damp: float = 0.01, act_order: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K], H [K, K] -> (codes uint8 [N, K], scales [N, G'], zeros uint8 [N, G']) as rtn.quantize_int4.

    Without act-order each group's scale and zero point are found when its first column comes up, from the
    weights as updated so far (the paper's grouping); with act-order they are static (original weights).
    Works on the transpose (one input column = one contiguous row) in float32, as the reference code does;
    only H^-1 is formed in float64.
    """
    W = weight.float().clone()
    K = W.shape[1]
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    block_size = max(group_size, block_size // group_size * group_size) if group_size < K else block_size
    _, scales, zeros = rtn.quantize_int4(W, group_size)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    Wt = W.T[perm].contiguous()
    Hinv = _inverse_hessian_cholesky(H[perm][:, perm], damp).float()
    codes = torch.empty_like(Wt)
    groups = None if act_order else (scales, zeros)  # filled in as the groups come up
    cols = torch.arange(K, device=W.device)[perm] // group_size
    with _one_thread():
        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            if groups is not None:
                _dynamic_groups(Wt, groups, i1, i2, group_size)
            s_t, z_t = scales.T[cols[i1:i2]], zeros.T[cols[i1:i2]].float()
            err = _quantize_block(Wt, Hinv, codes, s_t, z_t, i1, i2)
            Wt[i2:] -= Hinv[i1:i2, i2:].T @ err
    return codes[torch.argsort(perm)].T.to(torch.uint8).contiguous(), scales, zeros


@contextmanager
def _one_thread():
    """The column loop is thousands of small ops: on a busy 2-core machine, OpenMP threads waiting on each
    other made it 20-50x slower (a 3072 x 576 weight: 18.7 s with 2 threads, 0.4-1.0 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _dynamic_groups(Wt, groups, i1: int, i2: int, group_size: int) -> None:
    """Scale and zero point of the groups starting in block [i1, i2), from the current (updated) weights.
    Blocks are whole groups, so a group never sees updates from inside its own block before it is set."""
    scales, zeros = groups
    for g0 in range(i1, i2, group_size):
        rows = Wt[g0:g0 + group_size]
        s, z = rtn.int4_params(rows.amax(dim=0), rows.amin(dim=0))
        scales[:, g0 // group_size], zeros[:, g0 // group_size] = s, z.to(zeros.dtype)


def _quantize_block(Wt, Hinv, codes, s_t, z_t, i1: int, i2: int) -> torch.Tensor:
    """Input columns i1..i2 (rows of Wt) one by one, updating the rest of the block; returns the scaled
    errors [i2 - i1, N]. s_t, z_t: [i2 - i1, N] scale and zero of each column's group."""
    W1 = Wt[i1:i2].clone()
    Hinv1 = Hinv[i1:i2, i1:i2]
    err = torch.empty_like(W1)
    for i in range(i2 - i1):
        w, s, z = W1[i], s_t[i], z_t[i]
        q = torch.round(w / s + z).clamp_(0, rtn.INT4_MAX)
        codes[i1 + i] = q
        e = (w - (q - z) * s) / Hinv1[i, i]
        W1[i:].addr_(Hinv1[i, i:], e, alpha=-1)
        err[i] = e
    return err
