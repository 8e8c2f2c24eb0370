"""Tiny random-weight HF checkpoints of each supported architecture, made offline for tests.

    make_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=3, max_shard_size="40KB")

Weights come from transformers' own init under a fixed seed, with a larger init scale than the default 0.02,
so that attention scores (and hence RoPE) visibly matter: at 0.02 every head attends almost uniformly and a
wrong rotary implementation would still match the reference.
"""
from __future__ import annotations

from pathlib import Path

import torch

_COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)

# original_max_position_embeddings=32 with head_dim 16 and theta 10000 puts wavelengths in all three llama3
# bands (kept: < 8, interpolated: 8..32, divided by factor: > 32), and tests can run past position 32.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

ARCHS = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=3, rope_parameters=LLAMA3_ROPE)),
    "llama2": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # head_dim 32 != hidden / heads (16), as in Mistral Nemo: q_size 128 != hidden 64.
    "mistral": ("MistralConfig", dict(head_dim=32, sliding_window=4096, vocab_size=256,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2": ("Qwen2Config", dict(vocab_size=384, eos_token_id=3, bos_token_id=None,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # SmolLM2-like: tied embeddings, multi-query (1 KV head: 4 query heads per KV head).
    "smol": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1, vocab_size=512,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e5})),
}


def make_tiny_checkpoint(arch: str, path, **overrides) -> Path:
    """Write a safetensors checkpoint of architecture `arch` (one of ARCHS) to `path`; returns the path.

    Keyword overrides go to the HF config, except `max_shard_size` (to save_pretrained: e.g. "40KB" makes a
    sharded checkpoint with an index json) and `seed` (default 0).
    """
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(ARCHS)}")
    path = Path(path)
    max_shard_size = overrides.pop("max_shard_size", None)
    seed = overrides.pop("seed", 0)
    config_cls, arch_kwargs = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **arch_kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return path
