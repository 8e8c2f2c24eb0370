"""The set of fused operations a model calls, chosen once per engine: torch references or Triton kernels.

Models receive a KernelOps at construction (no module-level switch), so one engine on CPU and another on
the GPU can live in one process, and tests can run a model through either path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from backend.kernels.activation import silu_and_mul_ref
from backend.kernels.paged_attention import paged_attention_ref
from backend.kernels.rms_norm import rms_norm_quant_ref, rms_norm_ref
from backend.kernels.rotary import rotary_and_cache_ref


@dataclass(frozen=True)
class KernelOps:
    rms_norm: Callable  # (x, weight, eps, residual=None) -> (normed, x + residual)
    silu_and_mul: Callable  # (gate_up [T, 2I]) -> [T, I]
    rotary_and_cache: Callable  # (q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping) -> (q, k)
    paged_attention: Callable  # (q [T, Hq, D], kv_cache, meta, scale) -> [T, Hq, D]
    name: str = "torch"
    # rms_norm with its output quantized per token for a W8A8 product (kind "int8" / "fp8"):
    rms_norm_quant: Callable | None = None  # (x, weight, eps, residual, kind) -> ((codes, scales), x + residual)
    # rotary_and_cache then paged_attention of a decode step in one op, where the ops have one:
    rotary_decode_attention: Callable | None = None  # (q, k, v, positions, cos_sin_cache, kv_cache, meta, scale)


REFERENCE_OPS = KernelOps(rms_norm_ref, silu_and_mul_ref, rotary_and_cache_ref, paged_attention_ref, "torch",
                          rms_norm_quant_ref)


def select_ops(backend: str, device_type: str) -> KernelOps:
    """'auto' means Triton kernels on CUDA and the torch references elsewhere."""
    if backend == "torch" or (backend == "auto" and device_type != "cuda"):
        return REFERENCE_OPS
    from backend.kernels import triton_ops  # imported only when asked: triton is optional on CPU

    return triton_ops.TRITON_OPS
