"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time and spread each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's
calibration inputs, so the layer's *output* error is minimized rather than the weight error.

Written from the paper's algorithm (blocks of 128 columns with lazy updates, Cholesky form of H^-1, damping of
the diagonal). Act-order (columns in order of decreasing H diagonal) uses static groups: each group's scale and
zero point come from the original weights before any update, so the groups stay contiguous in the checkpoint and
the kernels need no per-column group index.

The column loop only needs a rounding function, so the same solver serves INT4 (groups, zero points) and FP8
e4m3 (per-channel scales; the paper's error feedback applied to a floating-point grid).

GPTQ visits each column once and never revisits a rounding after later columns moved. Two sweeps of coordinate
descent on the same objective follow (QuantEase's idea, Behdin et al., 2023): each column's codes are re-rounded
at the best value given all the other columns, which can only lower the (damped) calibration error. On
SmolLM2-135M (20 held-out windows, groups of 32): GPTQ +9.7% -> +8.8%, AWQ (whose weights GPTQ rounds) +5.3% ->
+4.8%; 8 sweeps lowered the calibration error further but measured +9.2%, so the Hessian's noise starts to
show, and FP8 (W8A8) went +1.3% -> +1.6%, so its weights keep GPTQ's single pass. At groups of 128 AWQ went
+11.1% -> +8.9% but plain GPTQ +14.5% -> +15.8% (perf/RESULTS.md, session 11).

Measured on SmolLM2-135M (held-out error of one projection's output, layers 1/8/15): with 4k calibration tokens
the down_proj (K = 1536) Hessian overfits -- its held-out error was no better than round-to-nearest -- so the
calibrated methods now take 32 windows of 512 tokens by default and the damping is 5% of the mean diagonal
(1% is the paper's default for 128 x 2048 tokens; more damping is the standard remedy for fewer tokens).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from . import rtn

DAMP = 0.05
REFINE_SWEEPS = 2  # coordinate-descent sweeps after the GPTQ pass (module docstring)
# Range shrink ratios tried for each static group (GPTQ's reference quantizer's `mse` option and AWQ's
# clipping: a group's range need not be its min..max when the extremes are rare; 1.0 is plain min-max).
SHRINKS = tuple(1.0 - 0.02 * i for i in range(13))


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


def int4_static_groups(W: torch.Tensor, h_diag: torch.Tensor, group_size: int,
                       shrinks=SHRINKS) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [N, G'] of each group: the range shrink (of min and max alike) minimizing the group's
    rounding error weighted by H's diagonal (each input column's share of the output error)."""
    g = rtn.group_view(W, group_size)  # [N, G', g]
    hw = rtn.group_view(h_diag.float()[None, :], group_size)  # [1, G', g]; 0 on padding
    w_max, w_min = g.amax(dim=2), g.amin(dim=2)
    best = torch.full(w_max.shape, float("inf"), device=W.device)
    scales, zeros = rtn.int4_params(w_max, w_min)
    for ratio in shrinks:
        s, z = rtn.int4_params(w_max * ratio, w_min * ratio)
        deq = (rtn.int4_codes(g, s[..., None], z[..., None]) - z[..., None]) * s[..., None]
        err = ((deq - g).pow(2) * hw).sum(2)
        better = err < best
        best = torch.where(better, err, best)
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
    return scales, zeros


def gptq_quantize_int4(weight: torch.Tensor, H: torch.Tensor, group_size: int, block_size: int = 128,
                       damp: float = DAMP, act_order: bool = True, refine_sweeps: int = REFINE_SWEEPS
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K], H [K, K] -> (codes uint8 [N, K], scales [N, G'], zeros uint8 [N, G']) as rtn.quantize_int4.

    Static groups (found before any update, see int4_static_groups), with or without act-order.
    """
    W = weight.float().clone()
    K = W.shape[1]
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    scales, zeros = int4_static_groups(W, torch.diag(H), group_size)
    col_group = torch.arange(K, device=W.device) // group_size
    s_cols, z_cols = scales.T[col_group].contiguous(), zeros.T[col_group].contiguous()  # [K, N]

    def round_column(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = s_cols[k], z_cols[k]
        q = torch.round(w / s + z).clamp_(0, rtn.INT4_MAX)
        return q, (q - z) * s

    codes = _solve_and_refine(W, H, round_column, damp, act_order, block_size, refine_sweeps)
    return codes.to(torch.uint8), scales, zeros.to(torch.uint8)


def gptq_quantize_fp8(weight: torch.Tensor, H: torch.Tensor, block_size: int = 128, damp: float = DAMP,
                      act_order: bool = True, refine_sweeps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8_e4m3fn [N, K], float32 scales [N]) as rtn.quantize_fp8: the same per-channel
    scales (from the original weights), codes chosen column by column with GPTQ's error feedback. No refinement
    sweeps by default: on SmolLM2-135M two took W8A8 from +1.3% to +1.6% (20 held-out windows)."""
    W = weight.float().clone()
    _, scales = rtn.quantize_fp8(W)

    def round_column(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = (w / scales).clamp_(-rtn.FP8_MAX, rtn.FP8_MAX).to(torch.float8_e4m3fn).float()
        return q, q * scales

    codes = _solve_and_refine(W, H, round_column, damp, act_order, block_size, refine_sweeps)
    return codes.to(torch.float8_e4m3fn), scales


def _solve_and_refine(W: torch.Tensor, H: torch.Tensor, round_column: Callable, damp: float, act_order: bool,
                      block_size: int, sweeps: int) -> torch.Tensor:
    """GPTQ's pass, then `sweeps` of coordinate descent from its codes; codes [N, K] (float32)."""
    codes, dequantized = _solve(W, H, round_column, damp, act_order, block_size)
    if sweeps:
        codes = _refine(W, H, codes, dequantized, round_column, damp, sweeps, block_size)
    return codes


def _refine(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, dequantized: torch.Tensor,
            round_column: Callable, damp: float, sweeps: int, block_size: int) -> torch.Tensor:
    """Coordinate descent on tr(E H E^T), E = W - dequantized, H damped as in the solve; returns the codes.

    For column k alone the error is a quadratic whose minimum, given every other column, sits at
    dequantized[:, k] + (E H)[:, k] / H[k, k]; the grid point nearest it is the exact minimum along that
    coordinate (the curvature is H[k, k] in every row), so no step raises the calibration error. E H is kept
    current as GPTQ's solve keeps its weights: exactly within a block of columns, and for the other columns by
    one matrix product per block (a rank-1 update of all of E H per column would cost a full pass over it)."""
    K = W.shape[1]
    H = H.float().clone()
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype, device=H.device)
    codes_t, deq_t = codes.T.contiguous(), dequantized.T.contiguous()  # one column = one contiguous row
    grad_t = H @ (W.T - deq_t)  # (E H)^T
    diag = torch.diag(H).tolist()
    with _one_thread():
        for _ in range(sweeps):
            for b0 in range(0, K, block_size):
                b1 = min(b0 + block_size, K)
                local = grad_t[b0:b1].clone()
                change = torch.zeros_like(local)  # per column: new error - old error
                for j, k in enumerate(range(b0, b1)):
                    if diag[k] <= 0:  # only when H is all zeros (no calibration signal at all)
                        continue
                    q, deq = round_column(deq_t[k] + local[j] / diag[k], k)
                    change[j] = deq_t[k] - deq
                    local[j:].addr_(H[k:b1, k], change[j])
                    codes_t[k], deq_t[k] = q, deq
                grad_t += H[:, b0:b1] @ change
    return codes_t.T.contiguous()


def _solve(W: torch.Tensor, H: torch.Tensor, round_column: Callable, damp: float, act_order: bool,
           block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ column loop on W [N, K] (float32): (codes, dequantized) [N, K] (float32) from round_column(w [N],
    k) -> (codes [N], dequantized [N]) for original column index k. Works on the transpose (one input column = one
    contiguous row) in float32, as the reference code does; only H^-1 is formed in float64."""
    K = W.shape[1]
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    Wt = W.T[perm].contiguous()
    Hinv = _inverse_hessian_cholesky(H[perm][:, perm], damp).float()
    codes, dequantized = torch.empty_like(Wt), torch.empty_like(Wt)
    order = perm.tolist()
    with _one_thread():
        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            W1 = Wt[i1:i2].clone()
            Hinv1 = Hinv[i1:i2, i1:i2]
            err = torch.empty_like(W1)
            for i in range(i2 - i1):
                q, deq = round_column(W1[i], order[i1 + i])
                codes[i1 + i], dequantized[i1 + i] = q, deq
                e = (W1[i] - deq) / Hinv1[i, i]
                W1[i:].addr_(Hinv1[i, i:], e, alpha=-1)
                err[i] = e
            Wt[i2:] -= Hinv[i1:i2, i2:].T @ err
    inverse = torch.argsort(perm)
    return codes[inverse].T.contiguous(), dequantized[inverse].T.contiguous()


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
