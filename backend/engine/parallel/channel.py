"""Rank 0 -> workers: what each step runs, as int64 CPU tensors broadcast on the gloo control group.

A step is the host-prepared integer inputs (HostStep: token ids, positions, slots, block tables, ... the same
arrays rank 0 copies to its own device), so every rank builds the identical batch and runs the identical
forward (eager or the same CUDA graph) with its own weight shard. Two broadcasts per step: a fixed-size
header (command, part sizes, the few scalars), then the payload. Token ids that async scheduling leaves as
placeholders are filled on rank 0's device and broadcast on the compute group (ModelRunner.device_inputs),
so no rank waits for the host copy of the previous step's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

STEP, STOP = 1, 2
HEADER_LEN = 32  # command, number of parts, the scalars below, then the part sizes
_SCALARS = 3  # block table rows, block table columns, max query length


@dataclass
class HostStep:
    """A step's integer inputs on the host, in ModelRunner.host_inputs' order."""

    parts: list  # numpy arrays or lists of ints
    table_shape: tuple[int, int]
    max_query_len: int


def send_step(group, step: HostStep) -> None:
    sizes = [len(part) for part in step.parts]
    header = [STEP, len(sizes), *step.table_shape, step.max_query_len, *sizes]
    _broadcast_header(group, header)
    payload = np.concatenate([np.asarray(part, dtype=np.int64) for part in step.parts])
    dist.broadcast(torch.from_numpy(payload), src=0, group=group.control)


def send_stop(group) -> None:
    _broadcast_header(group, [STOP, 0])


def receive_step(group) -> HostStep | None:
    """The next step from rank 0, or None when rank 0 says stop. Blocks while the engine is idle."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group.control)
    command, num_parts, rows, cols, max_query_len = header[:2 + _SCALARS].tolist()
    if command == STOP:
        return None
    sizes = header[2 + _SCALARS:2 + _SCALARS + num_parts].tolist()
    payload = torch.empty(sum(sizes), dtype=torch.int64)
    dist.broadcast(payload, src=0, group=group.control)
    return HostStep(np.split(payload.numpy(), np.cumsum(sizes)[:-1]), (rows, cols), max_query_len)


def _broadcast_header(group, values: list[int]) -> None:
    if len(values) > HEADER_LEN:
        raise ValueError(f"step header of {len(values)} values exceeds {HEADER_LEN}")
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[:len(values)] = torch.tensor(values, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group.control)
