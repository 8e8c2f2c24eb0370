"""Programmatic dependent launch (PDL, Hopper and later): let a decode kernel start before the one ahead of it ends.

At batch 1 a decode step is ~350 short kernels, and between two of them the GPU idles for the launch and for
the first loads of the next kernel to come back from HBM. With PDL (CUDA's programmatic stream serialization,
kept as programmatic edges when the step is captured in a CUDA graph) a kernel's programs may be scheduled as
soon as every program of the kernel ahead has signalled `gdc_launch_dependents`; they must then `gdc_wait`
(which returns once the kernel ahead has finished and its writes are visible) before they read anything an
earlier kernel wrote or write anything at all. TensorRT-LLM and SGLang launch their decode kernels the same way;
this is our own use of Triton's `griddepcontrol` wrappers.

Rules every kernel given PDL=True here keeps:
- every program calls gdc_wait before it stores anything or loads what a kernel writes (and before it returns);
  only loads of what no kernel writes (weights, their scales) may come first (preload_first_tile below);
- gdc_launch_dependents comes right after the wait in small kernels, after the main loop in the GEMVs.
Measured on an H100 (perf/bench_pdl.py, perf/RESULTS.md): the GEMVs signalling before their loop, and an L2
prefetch of their first weight lines issued before the wait, both made the chain slower than this; so did a
bulk L2 prefetch of the rest of each program's rows (session 11: bf16 no gain, INT8 27-75 us per step slower).
A kernel launched without the attribute (cuBLAS, torch ops) simply waits for the whole kernel ahead, as usual.
Off with TRITIUM_PDL=0, on CPUs, under the Triton interpreter, and before compute capability 9.0.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401 (used by kernels)
except ImportError:  # CPU installs without triton never launch a kernel
    pass

_enabled = os.environ.get("TRITIUM_PDL", "1") != "0"

# With PDL the programs of a batch-1 GEMV are resident while the kernel ahead finishes, and that kernel is
# latency-bound (an RMSNorm or a tensor-parallel all-reduce before qkv and gate_up, attention before o, SiLU
# before down): HBM idles meanwhile. So each GEMV program loads its first weight tile before the wait (weights
# depend on no kernel), and it streams then: 5.532 -> 5.497 ms per 8B step on an H100, TP2 382.6 -> 398.4 tok/s
# on 2x H200 (perf/ablate_decode.py, perf/RESULTS.md). Only the first tile, added in as soon as x is there: more
# columns before the wait, or the first tile held to the end of the loop, was slower (5.70-5.90 ms: registers),
# as was session 6's version, which ran one tile ahead by hand. TRITIUM_GEMV_PRELOAD=0 turns it off.
preload_first_tile = os.environ.get("TRITIUM_GEMV_PRELOAD", "1") != "0"


def set_enabled(enabled: bool) -> None:
    """Turns PDL on or off for launches from now on (benchmarks compare both in one process); a CUDA graph keeps
    the launches it captured."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


@functools.cache
def _device_supports(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def is_hopper_or_later(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or more (PDL, TMA), looked up once per device."""
    return device.type == "cuda" and _device_supports(
        device.index if device.index is not None else torch.cuda.current_device())


def pdl_args(device: torch.device) -> dict:
    """Launch keywords for a kernel that takes a PDL constexpr: {"PDL": on, "launch_pdl": on}."""
    on = _enabled and os.environ.get("TRITON_INTERPRET") != "1" and is_hopper_or_later(device)
    return {"PDL": on, "launch_pdl": on}
