"""Writing a quantized checkpoint: HF tensor names, safetensors shards, config.json with quantization_config,
and the tokenizer and generation files copied over.

A quantized projection `P.weight` becomes (by format):
    w8a16, w8a8: P.qweight int8 [N, K], P.scales float16 [N]
    w4a16:       P.qweight uint8 [N, K/2], P.scales float16 [N, K/G], P.qzeros uint8 [N, K/G]
    fp8:         P.weight float8_e4m3fn [N, K], P.weight_scale float32 [N]
With quantization_config.lm_head the head is written as `lm_head` in QuantConfig.head_format (from the
embedding when the two are tied: the embedding itself stays a float lookup table).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch

from backend.kernels.quant_matmul import pack_int4

from . import rtn
from .config import QuantConfig

# HF names of the projections we quantize (the model fuses q/k/v and gate/up; checkpoints keep them apart).
HF_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 2 << 30
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


def is_quantized_weight(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in HF_LINEARS


def quantize_weight(qcfg: QuantConfig, prefix: str, weight: torch.Tensor,
                    fmt: str | None = None) -> dict[str, torch.Tensor]:
    """Round-to-nearest tensors of one projection, named for the checkpoint, in `fmt` (default qcfg.format)."""
    fmt = fmt or qcfg.format
    if fmt == "fp8":
        q, s = rtn.quantize_fp8(weight)
        return {f"{prefix}.weight": q, f"{prefix}.weight_scale": s}
    if fmt == "w4a16":
        q, s, z = rtn.quantize_int4(weight, qcfg.group_size)
        return int4_tensors(prefix, q, s, z)
    q, s = rtn.quantize_int8(weight)
    return {f"{prefix}.qweight": q, f"{prefix}.scales": s.half()}


def int4_tensors(prefix: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict:
    return {f"{prefix}.qweight": pack_int4(codes), f"{prefix}.scales": scales.half(),
            f"{prefix}.qzeros": zeros.to(torch.uint8)}


def rtn_tensors(qcfg: QuantConfig, weights: Iterable[tuple[str, torch.Tensor]],
                dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The streaming pass of the round-to-nearest methods: one tensor in memory at a time."""
    for name, tensor in weights:
        if is_quantized_weight(name):
            yield from quantize_weight(qcfg, name[: -len(".weight")], tensor).items()
        else:
            yield name, cast(tensor, dtype)


def with_quantized_head(tensors: Iterable[tuple[str, torch.Tensor]], qcfg: QuantConfig,
                        tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with the LM head quantized (round-to-nearest, per output channel): from
    lm_head.weight, or for tied embeddings from the embedding, which is kept as it is for the input lookup."""
    for name, tensor in tensors:
        if name == "lm_head.weight":
            if not tied:  # a tied checkpoint may store a copy of the embedding here: the head comes from that
                yield from quantize_weight(qcfg, "lm_head", tensor, qcfg.head_format).items()
            continue
        yield name, tensor
        if tied and name == "model.embed_tokens.weight":
            yield from quantize_weight(qcfg, "lm_head", tensor, qcfg.head_format).items()


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path) -> int:
    """Writes model.safetensors (or numbered shards with an index past SHARD_BYTES); returns bytes written."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        shards.append(list(current))
        save_file(current, str(out_dir / f"part-{len(shards)}.tmp"), metadata={"format": "pt"})

    for name, tensor in tensors:
        current[name] = tensor.detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        size, total = size + nbytes, total + nbytes
        if size >= SHARD_BYTES:
            flush()
            current, size = {}, 0
    if current or not shards:
        flush()
    _name_shards(shards, out_dir)
    return total


def _name_shards(shards: list[list[str]], out_dir: Path) -> None:
    if len(shards) == 1:
        os.replace(out_dir / "part-1.tmp", out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out_dir / f"part-{i}.tmp", out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def write_configs(src_dir: Path, out_dir: Path, qcfg: QuantConfig, dtype: torch.dtype | None) -> None:
    config = json.loads((src_dir / "config.json").read_text())
    config["quantization_config"] = qcfg.to_json()
    if qcfg.rotated:  # the rotated embedding and head differ (rotation.py)
        config["tie_word_embeddings"] = False
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)
