"""One process's place in a tensor-parallel group, and the two collectives the model needs.

Two process groups, both from torch.distributed (no transport of our own):
  * `control`: gloo, CPU tensors, effectively no timeout. Rank 0 broadcasts each step's inputs on it; a
    worker waits on it while the engine is idle, which may last days, so its timeout must not fire.
  * `compute`: NCCL on CUDA (gloo on CPU), the all-reduces inside the forward pass (and inside CUDA graphs).
Small all-reduces (decode's 8 KB partial sums) go through PyTorch's symmetric memory instead when every rank
can use it (custom_all_reduce.py; EngineConfig.custom_all_reduce), decided once at join_group.
A dead peer shows up on gloo as a closed connection at the next collective; on NCCL a collective with a dead
peer never finishes, so rank 0 also watches its workers' processes (workers.py) and never waits on the GPU
without checking them (runner.py).

Pipeline parallelism would add a third axis here: a rank is (pipeline stage, tensor rank), with one compute
group per stage and point-to-point send/recv of hidden states between stages (README, "Multi-GPU").
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import custom_all_reduce

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
IDLE_TIMEOUT = datetime.timedelta(days=365)  # control group: workers wait there while the engine is idle


@dataclass
class ParallelGroup:
    rank: int
    world_size: int
    device: torch.device
    control: object  # gloo ProcessGroup for step messages (CPU tensors)
    compute: object  # NCCL (CUDA) or gloo (CPU) ProcessGroup for the forward's collectives
    custom: custom_all_reduce.SymmMemAllReduce | None = None  # small all-reduces; None: all through `compute`
    all_reduce_note: str = ""  # why this path (logged at start; benchmarks record it)

    @property
    def all_reduce_path(self) -> str:
        return "symm_mem" if self.custom is not None else "dist.all_reduce"

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and talks to the caller; the others only run forwards."""
        return self.rank == 0

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the row-parallel partial outputs, in place (captured into CUDA graphs like any kernel)."""
        if self.custom is not None and self.custom.fits(x):
            return self.custom.all_reduce_(x)
        dist.all_reduce(x, group=self.compute)
        return x

    def fused_all_reduce_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                  eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(norm(sum + residual), sum + residual) for x a row-parallel layer's partial sum, by one kernel
        (custom_all_reduce.NormAllReduce) where it takes x -- decode rows -- and None elsewhere; the shapes alone
        decide, so every rank takes the same path."""
        fused = self.custom.norm if self.custom is not None else None
        if fused is None or not fused.fits(x, residual):
            return None
        return fused(x, residual, weight, eps)

    def gather_vocab(self, local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[N, V/K] logits of this rank's vocabulary slice -> [N, V] on every rank (padding cut off)."""
        n, shard = local_logits.shape
        full_bytes = n * self.world_size * shard * local_logits.element_size()
        if self.custom is not None and full_bytes <= custom_all_reduce.ONE_SHOT_MAX_BYTES:
            gathered = self._gather_by_sum(local_logits)
            if gathered is not None:
                return gathered[:, :vocab_size]
        gathered = torch.empty((self.world_size * n, shard), dtype=local_logits.dtype, device=local_logits.device)
        dist.all_gather_into_tensor(gathered, local_logits.contiguous(), group=self.compute)  # rank-major rows
        by_rank = gathered.view(self.world_size, n, shard)
        return by_rank.permute(1, 0, 2).reshape(n, self.world_size * shard)[:, :vocab_size]

    def _gather_by_sum(self, local_logits: torch.Tensor) -> torch.Tensor | None:
        """Batch-1 decode's gather as a one-shot all-reduce: each rank writes its slice into zeros and the sum is
        every slice in place (x + 0 is exact), already in [N, V] order: no NCCL all_gather (its own ~10+ us)
        and no permute copy. None where the symmetric-memory path does not take the tensor."""
        n, shard = local_logits.shape
        full = local_logits.new_zeros(n, self.world_size * shard)
        if not self.custom.fits(full):
            return None
        full[:, self.rank * shard:(self.rank + 1) * shard] = local_logits
        return self.custom.all_reduce_(full)

    def broadcast_from_driver_(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's values into x on every rank (device tensors: no host round trip)."""
        dist.broadcast(x, src=0, group=self.compute)
        return x

    def min_over_ranks(self, value: int) -> int:
        """Every rank must size its KV cache alike: the block manager on rank 0 hands out block ids for all."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def abort(self) -> None:
        """Abort the NCCL communicator so that collectives waiting for a dead peer return (with an error)
        instead of spinning on the GPU forever; gloo needs nothing: a dead peer closes its sockets."""
        if self.device.type == "cuda":
            try:
                dist.distributed_c10d._abort_process_group(self.compute)
            except Exception as exc:  # best effort: the engine is failing already
                log.warning("aborting the NCCL group failed: %s", exc)

    def destroy(self) -> None:
        self.custom = None  # its buffer belongs to the group
        if dist.is_initialized():
            dist.destroy_process_group()


def store_timeout_s() -> float:
    """Rendezvous and compute-collective timeout: long enough for one rank to compile kernels while another
    waits in warm-up; TRITIUM_TP_TIMEOUT_S overrides it."""
    return float(os.environ.get("TRITIUM_TP_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def join_group(rank: int, world_size: int, device: torch.device, timeout_s: float, store,
               custom_all_reduce_enabled: bool = True) -> ParallelGroup:
    """Build the control and compute groups over `store` (a TCPStore that rank 0 hosts: the same
    MASTER_ADDR/MASTER_PORT rendezvous a multi-node launch would use, README), and pick the all-reduce path
    (collective: every rank takes the same one)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=IDLE_TIMEOUT)
    control = dist.group.WORLD
    if device.type == "cuda":
        torch.cuda.set_device(device)
        compute = dist.new_group(backend="nccl", timeout=timeout)
    else:
        compute = dist.new_group(backend="gloo", timeout=timeout)
    log.info("rank %d/%d joined (device %s)", rank, world_size, device)
    group = ParallelGroup(rank, world_size, device, control, compute)
    if custom_all_reduce_enabled:
        group.custom, group.all_reduce_note = custom_all_reduce.setup(rank, world_size, device, control, compute,
                                                                      timeout_s)
    else:
        group.all_reduce_note = "custom_all_reduce is off"
    log.info("rank %d: tensor-parallel all-reduce through %s (%s)", rank, group.all_reduce_path,
             group.all_reduce_note)
    return group


def host_store(world_size: int, timeout_s: float):
    """Rank 0's TCPStore on a free port of the loopback interface (port 0: the OS picks, no race)."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))
