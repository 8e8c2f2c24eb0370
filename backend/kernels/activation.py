"""SiLU-and-multiply: the gate of the Llama MLP, on the concatenated [gate | up] projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- Triton kernel ------------------------------------------------------------------------------------------
try:
    import triton.language as tl

    from backend.kernels._pdl import gdc_launch_dependents, gdc_wait
except ImportError:  # triton is optional on CPU: the reference above needs only torch
    tl = None

from backend.kernels._jit import lazy_jit
from backend.kernels._pdl import pdl_args

_SILU_BLOCK = 1024


@lazy_jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # grid (T, cdiv(I, BLOCK)): gate and up are the two halves of one row; math in float32, one rounding.
    if PDL:  # see _pdl.py: the next kernel may launch now; nothing here is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as silu_and_mul_ref: [..., 2I] -> [..., I]. Specializations: BLOCK (fixed), dtypes."""
    import triton

    inter = gate_up.shape[-1] // 2
    x2 = gate_up.reshape(-1, 2 * inter)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    out2 = out.view(-1, inter)
    block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
    if x2.shape[0] > 0:
        grid = (x2.shape[0], triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), inter, BLOCK=block, num_warps=4,
                                   **pdl_args(gate_up.device))
    return out
