"""Architecture name (config.json `architectures[0]`) -> model class, and the one way to build a model."""
from __future__ import annotations

import torch

from backend.engine.errors import UnsupportedModelError
from backend.engine.model_config import ModelConfig
from backend.engine.ops import KernelOps

from .llama import LlamaForCausalLM

# Mistral and Qwen2 differ from Llama only in config (sliding window, qkv bias), which ModelConfig carries.
MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def model_class(architecture: str) -> type:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        ) from None


def build_model(model_config: ModelConfig, ops: KernelOps, dtype: torch.dtype, device: str | torch.device,
                tp=None):
    """An uninitialized model (weights are empty until load_weights) of `dtype` on `device`; with `tp` (a
    ParallelGroup) the model of one tensor-parallel rank, built from that rank's (sharded) config.

    Built on the meta device and then materialized, so no time goes into random init (minutes at 8B on CPU).
    """
    cls = model_class(model_config.architecture)
    with torch.device("meta"):
        model = cls(model_config, ops) if tp is None else cls(model_config, ops, tp)
        model = model.to(dtype)  # cast while on meta: free, and no second copy of the weights
    model = model.to_empty(device=device)
    model.init_rotary()  # the cos/sin table stays float32 whatever `dtype` is
    return model.eval()
