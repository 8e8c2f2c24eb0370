"""The fused all-reduce + residual add + RMSNorm kernel (backend/kernels/all_reduce_norm.py), its ranks emulated
on one device: the ranks' kernels run one after another, and before rank r's kernel the pushes of the ranks
after it are written into r's buffer as they would have landed. So every push a kernel makes to a rank after it
is a real one, read by that rank's kernel; after each kernel the test checks that its pushes landed (a missing
one would leave the next kernel waiting forever). The 2-GPU test with real peers is in
tests/test_custom_all_reduce.py."""
import pytest
import torch

from backend.kernels.all_reduce_norm import (EMPTY, EMPTY32, SLOTS, all_reduce_rms_norm_ref,
                                             all_reduce_rms_norm_triton)

MAX_ROWS, ROW_STRIDE = 4, 256  # float32 rows: at most 128 wide
# bf16 on the GPU only: the interpreter rounds float32 -> bf16 differently from torch
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _bits(x: torch.Tensor) -> torch.Tensor:
    """What a rank pushes: its row's bit patterns, with the "empty" pattern sent as +0.0."""
    wide = x.dtype == torch.float32
    bits = x.view(torch.int32 if wide else torch.int16).clone()
    bits[bits == (EMPTY32 if wide else EMPTY)] = 0
    return bits


def _slots(buffer: torch.Tensor, dtype) -> torch.Tensor:
    """[slot, rank, row, word] view of a buffer at the width rows of `dtype` use."""
    if dtype == torch.float32:
        return buffer.view(torch.int32).view(SLOTS, -1, MAX_ROWS, ROW_STRIDE // 2)
    return buffer.view(SLOTS, -1, MAX_ROWS, ROW_STRIDE)


def _slot(buffer: torch.Tensor, dtype, slot: int, rank: int, rows: int, hidden: int) -> torch.Tensor:
    return _slots(buffer, dtype)[slot, rank, :rows, :hidden]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_rank_gets_the_reference_for_several_calls(device, world, dtype):
    rows, hidden, eps = 3, 100, 1e-5
    buffers = [torch.full((SLOTS * world * MAX_ROWS * ROW_STRIDE,), EMPTY, dtype=torch.int16, device=device)
               for _ in range(world)]
    epochs = [torch.zeros(MAX_ROWS, dtype=torch.int32, device=device) for _ in range(world)]
    weight = (torch.rand(hidden, device=device) + 0.5).to(dtype)
    for call in range(4):  # more calls than slots: each slot is used, cleared and used again
        partials = [torch.randn(rows, hidden, device=device).to(dtype) for _ in range(world)]
        partials[0][0, :5] = -0.0  # must travel as +0.0, not as "not written yet"
        residual = torch.randn(rows, hidden, device=device).to(dtype)
        want = all_reduce_rms_norm_ref(partials, residual, weight, eps)
        slot = call % SLOTS
        outputs = []
        for rank in range(world):
            for later in range(rank + 1, world):
                _slot(buffers[rank], dtype, slot, later, rows, hidden).copy_(_bits(partials[later]))
            outputs.append(all_reduce_rms_norm_triton(partials[rank], residual, weight, eps, buffers, rank,
                                                      epochs[rank], MAX_ROWS, ROW_STRIDE))
            for peer in range(rank + 1, world):
                landed = _slot(buffers[peer], dtype, slot, rank, rows, hidden)
                assert torch.equal(landed, _bits(partials[rank])), f"rank {rank}'s push to {peer} did not land"
            stale = _slots(buffers[rank], dtype)[(slot + 2) % SLOTS, :, :rows, :hidden]
            assert (stale == (EMPTY32 if dtype == torch.float32 else EMPTY)).all(), \
                "the slot of the previous call must be marked empty again"
            assert epochs[rank][:rows].tolist() == [call + 1] * rows and epochs[rank][rows:].eq(0).all()
        for normed, summed in outputs:
            torch.testing.assert_close(summed.float(), want[1].float(), rtol=0, atol=0)
            torch.testing.assert_close(normed.float(), want[0].float(), rtol=1e-2, atol=1e-2)
            assert torch.equal(normed, outputs[0][0]), "every rank must get the same bits"


def test_refuses_what_does_not_fit(device):
    x = torch.zeros(MAX_ROWS + 1, 64, device=device)
    buffers = [torch.full((SLOTS * 2 * MAX_ROWS * ROW_STRIDE,), EMPTY, dtype=torch.int16, device=device)] * 2
    epochs = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="does not fit"):
        all_reduce_rms_norm_triton(x, x, x[0], 1e-5, buffers, 0, epochs, MAX_ROWS, ROW_STRIDE)
