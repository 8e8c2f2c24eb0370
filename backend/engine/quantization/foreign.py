"""AutoAWQ and AutoGPTQ checkpoints, repacked into our W4A16 layout while their tensors stream in.

Their layouts (4-bit, int32 words of eight nibbles, nibble j at bits 4j..4j+3):
  AutoGPTQ: qweight [K/8, N] packed along K (word i of column n holds rows 8i..8i+7, in order);
            qzeros [G', N/8] packed along N, storing zero - 1 (the "gptq" checkpoint format); scales fp16
            [G', N]; g_idx [K] (group of each input column: act-order checkpoints permute it).
  AutoAWQ (GEMM): qweight [K, N/8] and qzeros [G', N/8] packed along N with nibble j holding column
            8i + AWQ_ORDER[j]; zeros stored as they are; scales fp16 [G', N].
Ours (see writer.py): codes [N, K] as uint8 pairs along K, scales and zeros [N, G'].
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from backend.kernels.quant_matmul import pack_int4

from .config import QuantConfig

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int32(words: torch.Tensor, dim: int) -> torch.Tensor:
    """Each int32 -> 8 nibbles along `dim` (nibble j from bits 4j)."""
    nibbles = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF  # [..., 8]
    if dim == 0:
        return nibbles.permute(0, 2, 1).reshape(words.shape[0] * 8, words.shape[1])
    return nibbles.reshape(words.shape[0], words.shape[1] * 8)


def pack_int32(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of unpack_int32: 8 values 0..15 along `dim` -> one int32."""
    v = values.to(torch.int32)
    v = v.reshape(-1, 8, v.shape[1]).permute(0, 2, 1) if dim == 0 else v.reshape(v.shape[0], -1, 8)
    return (v << _SHIFTS.to(v.device)).sum(dim=-1, dtype=torch.int32)


def _awq_columns(unpacked: torch.Tensor) -> torch.Tensor:
    """Undo AutoAWQ's interleave: unpacked column 8i + j holds real column 8i + AWQ_ORDER[j]."""
    order = torch.tensor(AWQ_ORDER, device=unpacked.device)
    inverse = torch.argsort(order)
    cols = unpacked.shape[1]
    return unpacked.view(-1, cols // 8, 8)[:, :, inverse].reshape(-1, cols)


def awq_to_ours(qweight, qzeros, scales) -> dict[str, torch.Tensor]:
    codes = _awq_columns(unpack_int32(qweight, dim=1)).T  # [N, K]
    zeros = _awq_columns(unpack_int32(qzeros, dim=1)).T
    return _ours(codes, scales.T, zeros)


def gptq_to_ours(qweight, qzeros, scales, g_idx: torch.Tensor | None, group_size: int) -> dict[str, torch.Tensor]:
    codes = unpack_int32(qweight, dim=0).T  # [N, K]
    K = codes.shape[1]
    if g_idx is not None:
        contiguous = torch.arange(K, device=g_idx.device) // group_size
        if not torch.equal(g_idx.long(), contiguous):
            raise ValueError("AutoGPTQ act-order checkpoints (desc_act with a permuted g_idx) are not supported: "
                             "re-quantize with desc_act=False, or use tools.quantize --quant int4_gptq")
    zeros = (unpack_int32(qzeros, dim=1) + 1).clamp(max=15).T  # stored as zero - 1
    return _ours(codes, scales.T, zeros[: codes.shape[0]])


def _ours(codes, scales, zeros) -> dict[str, torch.Tensor]:
    return {"qweight": pack_int4(codes), "scales": scales.contiguous(), "qzeros": zeros.to(torch.uint8).contiguous()}


_PARTS = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales", "g_idx")}


def convert_foreign(weights: Iterable[tuple[str, torch.Tensor]], qcfg: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Buffers each projection's packed tensors (they may sit in different shards) and yields ours."""
    parts = _PARTS[qcfg.source]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if leaf == "bias" and not tensor.any():
            continue  # AutoGPTQ stores all-zero biases for bias-free projections
        if leaf not in parts:
            yield name, tensor
            continue
        got = pending.setdefault(prefix, {})
        got[leaf] = tensor
        if all(p in got for p in parts[:3]) and (qcfg.source == "awq" or "g_idx" in got):
            yield from _convert(prefix, pending.pop(prefix), qcfg)
    for prefix, got in list(pending.items()):  # GPTQ checkpoints without g_idx
        if all(p in got for p in parts[:3]):
            yield from _convert(prefix, pending.pop(prefix), qcfg)
    if pending:
        raise ValueError(f"incomplete quantized tensors for {', '.join(sorted(pending)[:5])}")


def _convert(prefix: str, got: dict, qcfg: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    if qcfg.source == "awq":
        ours = awq_to_ours(got["qweight"], got["qzeros"], got["scales"])
    else:
        K = got["qweight"].shape[0] * 8
        group = K if qcfg.group_size == -1 else qcfg.group_size
        ours = gptq_to_ours(got["qweight"], got["qzeros"], got["scales"], got.get("g_idx"), group)
    for leaf, tensor in ours.items():
        yield f"{prefix}.{leaf}", tensor
