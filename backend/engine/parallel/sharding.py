"""Which part of each checkpoint tensor a tensor-parallel rank holds (Megatron-LM's layout, Shoeybi et al.
2019: column-parallel then row-parallel, so each attention block and each MLP needs one all-reduce).

  q/k/v, gate/up    column-parallel: rank r holds output rows [r*n/K, (r+1)*n/K) (whole heads, since the
                    q rows of head h are contiguous; contiguous q and kv head ranges keep GQA's pairing)
  o, down           row-parallel: the matching input columns; partial sums are all-reduced after them
  lm_head           vocab-parallel: rows [r*ceil(V/K), ...), zero-padded; logits are all-gathered
  embedding, norms  replicated: the embedding is only gathered (not read whole), so splitting it would save
                    memory but add an all-reduce to every step
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import torch

from backend.engine.errors import InvalidParameterError, UnsupportedModelError
from backend.engine.model_config import ModelConfig

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def check_divisible(cfg: ModelConfig, tp: int) -> None:
    """Every rank needs whole heads and an equal MLP slice; names the setting (and the model's numbers)."""
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("intermediate size", cfg.intermediate_size)):
        if n % tp:
            raise InvalidParameterError(
                "tensor_parallel_size", f"{tp} does not divide the model's {what} ({n})")


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The shape one rank builds: heads and MLP columns over tp; hidden size and vocabulary whole."""
    if tp == 1:
        return cfg
    check_divisible(cfg, tp)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp)


def vocab_shard_size(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp)


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, rank: int,
                  tp: int) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors -> this rank's slices, under the same names (load_weights checks the shapes).
    A tied checkpoint's embedding also yields this rank's lm_head slice (the head is vocab-parallel)."""
    for name, tensor in weights:
        projection = name.split(".")[-2] if "." in name else ""
        if projection in COLUMN_PARALLEL:
            yield name, tensor.chunk(tp, dim=0)[rank] if tensor.shape[0] % tp == 0 else _bad(name, tensor, tp)
        elif projection in ROW_PARALLEL:
            yield name, tensor.chunk(tp, dim=-1)[rank] if tensor.shape[-1] % tp == 0 else _bad(name, tensor, tp)
        elif name == "lm_head.weight":
            yield name, vocab_slice(tensor, rank, tp)
        else:
            yield name, tensor
            if name == "model.embed_tokens.weight" and cfg.tie_word_embeddings:
                yield "lm_head.weight", vocab_slice(tensor, rank, tp)


def vocab_slice(weight: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rows [rank*S, (rank+1)*S) of a [V, H] table, S = ceil(V/tp); the last slice is zero-padded to S."""
    size = vocab_shard_size(weight.shape[0], tp)
    part = weight[rank * size:(rank + 1) * size]
    if part.shape[0] == size:
        return part
    padded = torch.zeros((size,) + tuple(weight.shape[1:]), dtype=weight.dtype)
    padded[:part.shape[0]] = part
    return padded


def _bad(name: str, tensor: torch.Tensor, tp: int):
    raise ValueError(f"weight {name!r} of shape {tuple(tensor.shape)} cannot be split over {tp} ranks")


def load_shard(checkpoint_dir, config, ops, dtype: torch.dtype, device: torch.device, group):
    """(model of this rank, the full ModelConfig): checkpoint.load_model's steps with sliced weights, or
    random weights for load_format "dummy" (each rank its own: benchmarks only, not equal to tp=1)."""
    from backend.engine.checkpoint import iter_safetensors
    from backend.engine.model_runner import fill_random_weights
    from backend.engine.models.registry import build_model
    from backend.engine.quantization import QuantConfig

    cfg = ModelConfig.from_dir(checkpoint_dir)
    if QuantConfig.from_dir(checkpoint_dir) is not None:
        raise UnsupportedModelError("tensor_parallel_size > 1 with a quantized checkpoint is not supported yet")
    model = build_model(shard_config(cfg, group.world_size), ops, dtype, device, tp=group)
    if config.load_format == "dummy":
        fill_random_weights(model, config.seed + group.rank)
    else:
        model.load_weights(shard_weights(iter_safetensors(checkpoint_dir), cfg, group.rank, group.world_size))
    return model, cfg
