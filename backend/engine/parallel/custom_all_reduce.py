"""Small-message all-reduce on PyTorch's symmetric memory, for tensor-parallel decode inside CUDA graphs.

Why: a batch-1 decode step of the 8B shape does 64 all-reduces of 8 KB (two per layer). Through NCCL each one
costs ~10-15 us inside a CUDA graph, ~0.8 ms of a ~3.4 ms TP2 step (perf/RESULTS.md, "Multi-GPU (issue 6)").
At 8 KB the cost is latency, not bandwidth. A one-shot all-reduce, where every rank reads every peer's buffer
over NVLink and sums, with a flag barrier before and after, is one kernel of a few microseconds. That is the
custom all-reduce of vLLM (csrc/custom_all_reduce.cuh) and TensorRT-LLM (kernels/customAllReduceKernels.cu);
we take it from PyTorch rather than build a transport of our own. torch.distributed._symmetric_memory
allocates a buffer that every rank maps (handles exchanged through the process group's store), and
torch.ops.symm_mem.one_shot_all_reduce* / two_shot_all_reduce* run on it
(https://docs.pytorch.org/docs/stable/symmetric_memory.html).

How:
  * at engine start (setup(), from join_group) the ranks decide together on the gloo control group: a
    collective must take the same path on every rank. Each checks CUDA, peer access to every peer's GPU and the
    ops; then one persistent BUFFER_BYTES buffer is allocated and rendezvoused, and a known sum is checked.
    A failure anywhere means every rank uses dist.all_reduce (NCCL), and the log says which path and why.
  * per call (all_reduce_): bf16/fp32, contiguous, 16-byte aligned, at most ONE_SHOT_MAX_BYTES: one kernel
    (one_shot_all_reduce_copy_out copies the partial sum into this rank's buffer, syncs, and sums every rank's
    buffer into x). Larger, up to the buffer: two-shot (reduce-scatter then all-gather through the buffers,
    half the traffic per rank). Anything else goes to NCCL. The rendezvous happens once, before capture; inside
    a graph each op is a plain kernel launch on the current stream, with the peers' pointers baked in.
  * never multicast (NVLS / multimem_*): it is off on the machines we run on, and a program that uses it can
    take a shared host's GPUs out of service, so TORCH_SYMM_MEM_DISABLE_MULTICAST=1 is set before allocating.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BUFFER_BYTES = 8 * 1024 * 1024  # batch 1024 x 4096 bf16 decode rows; prefill above it goes to NCCL
ONE_SHOT_MAX_BYTES = 256 * 1024  # above this two-shot moves fewer bytes per rank (vLLM's 2-GPU split is similar)
ALIGN_BYTES = 16  # the ops' vectorized path; the symm buffer and the input must agree on alignment
DTYPES = (torch.bfloat16, torch.float32)  # what torch's symm_mem all-reduce kernels are compiled for
TWO_SHOT_WORLD_SIZES = (2, 4, 8)  # two_shot_all_reduce_out has no generic-world kernel
REQUIRED_OPS = ("one_shot_all_reduce_out", "two_shot_all_reduce_")  # older torch; the *_copy_out/_out forms
# below save a copy kernel where this torch has them


def unsupported_reason(x: torch.Tensor, buffer_bytes: int = BUFFER_BYTES) -> str | None:
    """Why `x` cannot take the symmetric-memory path (None: it can). Pure: tested on CPU."""
    nbytes = x.numel() * x.element_size()
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype}"
    if not x.is_contiguous():
        return "not contiguous"
    if nbytes == 0:
        return "empty"
    if nbytes % ALIGN_BYTES or (x.storage_offset() * x.element_size()) % ALIGN_BYTES or x.data_ptr() % ALIGN_BYTES:
        return f"not {ALIGN_BYTES}-byte aligned"
    if nbytes > buffer_bytes:
        return f"{nbytes} bytes > the {buffer_bytes}-byte buffer"
    return None


def algorithm(nbytes: int, world_size: int) -> str:
    """one_shot for small messages (latency-bound), two_shot for larger ones where the kernel exists."""
    if nbytes <= ONE_SHOT_MAX_BYTES or world_size not in TWO_SHOT_WORLD_SIZES:
        return "one_shot"
    return "two_shot"


NORM_MAX_ROWS = 16  # decode batches up to this take NormAllReduce (larger ones move bytes, not latency)
NORM_ROW_STRIDE = 16384  # the widest hidden size it takes; buffer: 3 x world x 16 x 16384 x 2 B (3 MiB per 2 ranks)


class NormAllReduce:
    """The all-reduce fused with the residual add and RMSNorm after it (backend/kernels/all_reduce_norm.py): this
    rank's buffer (a tensor) and its peers' (their addresses here, as DevicePointers), and its per-row call counts."""

    def __init__(self, buffers: list, rank: int, timeout_s: float):
        self.buffers, self.rank, self.timeout_s = buffers, rank, timeout_s
        self.epochs = torch.zeros(NORM_MAX_ROWS, dtype=torch.int32, device=buffers[rank].device)

    def fits(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        widest = NORM_ROW_STRIDE // (2 if x.dtype == torch.float32 else 1)  # the buffers hold 16-bit words
        return (residual is not None and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and 0 < x.shape[0] <= NORM_MAX_ROWS and x.shape[1] <= widest
                and residual.shape == x.shape and residual.dtype == x.dtype
                and x.stride(-1) == 1 and residual.stride(-1) == 1)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        from backend.kernels.all_reduce_norm import all_reduce_rms_norm_triton

        return all_reduce_rms_norm_triton(x, residual, weight, eps, self.buffers, self.rank, self.epochs,
                                          NORM_MAX_ROWS, NORM_ROW_STRIDE, self.timeout_s)


class SymmMemAllReduce:
    """One rank's persistent symmetric buffer and the all-reduce that runs through it, and the fused
    all-reduce + RMSNorm for decode rows (`norm`: None where TRITIUM_AR_NORM=0 or its self-test failed)."""

    def __init__(self, buffer: torch.Tensor, group_name: str, world_size: int, norm: NormAllReduce | None = None):
        self.buffer, self.group_name, self.world_size, self.norm = buffer, group_name, world_size, norm
        self.buffer_bytes = buffer.numel() * buffer.element_size()
        ops = torch.ops.symm_mem
        self._one_shot_copy = getattr(ops, "one_shot_all_reduce_copy_out", None)
        self._two_shot_out = getattr(ops, "two_shot_all_reduce_out", None)
        self._ops = ops

    def fits(self, x: torch.Tensor) -> bool:
        return unsupported_reason(x, self.buffer_bytes) is None

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks into x, in place; the caller checked fits(x)."""
        flat = x.view(-1)
        staging = self.buffer.view(x.dtype)[:flat.numel()]  # offset 0: 16-byte aligned like x
        one_shot = algorithm(flat.numel() * flat.element_size(), self.world_size) == "one_shot"
        if one_shot and self._one_shot_copy is not None:
            # In place is safe: each thread reads its elements of x (into the buffer) before the barrier
            # and writes the same elements after it.
            self._one_shot_copy(staging, flat, "sum", self.group_name, flat)
            return x
        staging.copy_(flat)
        if one_shot:
            self._ops.one_shot_all_reduce_out(staging, "sum", self.group_name, flat)
        elif self._two_shot_out is not None:
            self._two_shot_out(staging, "sum", self.group_name, flat)
        else:
            self._ops.two_shot_all_reduce_(staging, "sum", self.group_name)
            flat.copy_(staging)
        return x


def setup(rank: int, world_size: int, device: torch.device, control, compute,
          timeout_s: float) -> tuple[SymmMemAllReduce | None, str]:
    """Collective on every rank (the same answer everywhere): the symmetric-memory all-reduce, or None and why.
    timeout_s: how long the fused all-reduce + RMSNorm waits for a peer before it fails the process."""
    if device.type != "cuda":  # every rank of a group is on the same kind of device
        return None, "not on CUDA"
    reason = _local_blocker(rank, world_size, device, control)
    if not _all_agree(reason is None, control):
        return None, reason or "a peer rank cannot use it"
    impl, reason = None, None
    try:
        impl = _allocate(device, compute, world_size, timeout_s)
    except Exception as exc:  # an older torch, no peer mapping in this VM, ...: NCCL still works
        reason = f"symmetric memory setup failed: {type(exc).__name__}: {exc}"[:300]
    if not _all_agree(impl is not None, control):
        return None, reason or "setup failed on a peer rank"
    if not _all_agree(_self_test(impl, rank, world_size, device), control):
        return None, "self-test sum was wrong"
    note = f"one-shot <= {ONE_SHOT_MAX_BYTES // 1024} KiB, two-shot <= {BUFFER_BYTES >> 20} MiB, else NCCL"
    if impl.norm is None:
        return impl, note + "; no fused all-reduce + RMSNorm (TRITIUM_AR_NORM=0, or more than 8 ranks)"
    if not _all_agree(_norm_self_test(impl.norm, rank, world_size, device), control):
        impl.norm = None
        return impl, note + "; no fused all-reduce + RMSNorm (its self-test failed)"
    return impl, note + f"; all-reduce + RMSNorm fused for <= {NORM_MAX_ROWS} rows"


def _local_blocker(rank: int, world_size: int, device: torch.device, control) -> str | None:
    """What stops this rank: missing ops, or a peer GPU it cannot map. Collective (gathers the GPU ids)."""
    ids = torch.zeros(world_size, dtype=torch.int64)
    ids[rank] = device.index if device.index is not None else torch.cuda.current_device()
    dist.all_reduce(ids, group=control)
    try:  # import_module: an `import torch.x` statement here would make `torch` local to this whole function
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError as exc:
        return f"no torch.distributed._symmetric_memory ({exc})"
    missing = [name for name in REQUIRED_OPS if not hasattr(torch.ops.symm_mem, name)]
    if missing:
        return f"this torch lacks torch.ops.symm_mem.{', '.join(missing)}"
    me = int(ids[rank])
    blocked = [int(p) for p in ids.tolist() if p != me and not torch.cuda.can_device_access_peer(me, int(p))]
    return f"GPU {me} has no peer access to GPU(s) {blocked}" if blocked else None


def _all_agree(ok: bool, control) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=control)
    return bool(flag.item())


def _allocate(device: torch.device, compute, world_size: int, timeout_s: float) -> SymmMemAllReduce:
    """One symmetric allocation, rendezvoused once: the all-reduce's BUFFER_BYTES, then (unless turned off) the
    fused all-reduce + RMSNorm's slots, marked empty before the rendezvous, which no rank leaves until every rank
    has arrived, so no rank can push into a slot that is not cleared yet."""
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import torch.distributed._symmetric_memory as symm_mem
    from backend.kernels.all_reduce_norm import EMPTY, DevicePointer

    norm_words = _norm_words(world_size)
    buffer = symm_mem.empty(BUFFER_BYTES + 2 * norm_words, dtype=torch.uint8, device=device)
    slots = buffer[BUFFER_BYTES:].view(torch.int16)
    slots.fill_(EMPTY)
    torch.cuda.synchronize(device)
    name = compute.group_name
    handle = _rendezvous(symm_mem, buffer, name)
    backend = getattr(symm_mem, "get_backend", lambda d: "?")(device)
    log.info("symmetric memory: %d-byte buffer on %s, group %s, backend %s", buffer.numel(), device, name, backend)
    norm = None
    if norm_words:
        rank = compute.rank()
        norm = NormAllReduce([slots if r == rank else DevicePointer(address + BUFFER_BYTES, torch.int16)
                              for r, address in enumerate(handle.buffer_ptrs)], rank, timeout_s)
    return SymmMemAllReduce(buffer[:BUFFER_BYTES], name, world_size, norm)


def _norm_words(world_size: int) -> int:
    """16-bit words of NormAllReduce's slots; 0 (no fused all-reduce + RMSNorm) where TRITIUM_AR_NORM=0 (every
    rank sees the same environment) or for more ranks than the kernel takes."""
    from backend.kernels.all_reduce_norm import MAX_WORLD, SLOTS

    if world_size > MAX_WORLD or os.environ.get("TRITIUM_AR_NORM", "1") == "0":
        return 0
    return SLOTS * world_size * NORM_MAX_ROWS * NORM_ROW_STRIDE


def _rendezvous(symm_mem, buffer: torch.Tensor, group_name: str):
    """The buffer's symmetric-memory handle. Newer torch finds the group by name; older torch needs
    enable_symm_mem_for_group first (deprecated since, so it is called only when the plain rendezvous refuses:
    it also makes newer torch check the store on every rendezvous, pytorch#190977)."""
    try:
        return symm_mem.rendezvous(buffer, group_name)
    except RuntimeError as exc:
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is None:
            raise
        log.info("symmetric memory rendezvous without group info failed (%s); enabling the group", exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable(group_name)
    return symm_mem.rendezvous(buffer, group_name)


def _norm_self_test(norm: NormAllReduce, rank: int, world_size: int, device: torch.device) -> bool:
    """The fused kernel on rows whose sum over ranks is known (1 row and the most rows, an odd width; twice,
    so two slots are used), against the reference on the same partials."""
    from backend.kernels.all_reduce_norm import all_reduce_rms_norm_ref

    gen = torch.Generator().manual_seed(0)  # the same tensors on every rank
    try:
        for rows, hidden in ((1, 4100), (NORM_MAX_ROWS, 4096)):
            base = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16)
            residual = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16)
            weight = torch.rand(hidden, generator=gen).to(device, torch.bfloat16)
            partials = [base * (r + 1) for r in range(world_size)]
            want = all_reduce_rms_norm_ref(partials, residual, weight, 1e-5)
            for _ in range(2):
                got = norm(partials[rank], residual, weight, 1e-5)
                torch.cuda.synchronize(device)
                if not all(torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2) for g, w in zip(got, want)):
                    log.warning("fused all-reduce + RMSNorm self-test: wrong values (%d x %d)", rows, hidden)
                    return False
    except Exception as exc:
        log.warning("fused all-reduce + RMSNorm self-test failed: %s", exc)
        return False
    return True


def _self_test(impl: SymmMemAllReduce | None, rank: int, world_size: int, device: torch.device) -> bool:
    """A known sum through both algorithms: a mapping that 'works' but reads the wrong memory shows here.
    (A peer whose writes never land would hang here instead: the kernels' barriers have no timeout.)"""
    if impl is None:
        return False
    expected = world_size * (world_size + 1) / 2
    small = torch.full((4096,), rank + 1.0, dtype=torch.bfloat16, device=device)
    large = torch.full((2 * ONE_SHOT_MAX_BYTES // 4,), rank + 1.0, dtype=torch.float32, device=device)
    try:
        impl.all_reduce_(small)
        impl.all_reduce_(large)
        torch.cuda.synchronize(device)
    except Exception as exc:
        log.warning("symmetric-memory all-reduce self-test failed: %s", exc)
        return False
    return bool((small == expected).all().item() and (large == expected).all().item())
