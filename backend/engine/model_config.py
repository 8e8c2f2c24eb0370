"""The shape of a Llama-family checkpoint, read from its Hugging Face config.json (+ generation_config.json).

Parsed by hand (no transformers import) so the engine reads old and new config layouts alike:
transformers 5 writes rope settings as `rope_parameters` {rope_type, rope_theta, ...}; 4.x wrote a top-level
`rope_theta` and an optional `rope_scaling` {type|rope_type, ...}. Both are normalized here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidParameterError, UnsupportedModelError

# model_type -> architecture, for configs saved without `architectures` (e.g. config.save_pretrained alone).
_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Architectures whose q/k/v projections carry a bias even though their config has no `attention_bias` key.
_QKV_BIAS_ARCHS = {"Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = None  # None (plain RoPE) or {"rope_type": "llama3", factor, ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: str | None = None  # as the checkpoint declares it ("bfloat16", ...), or None
    sliding_window: int | None = None  # only when the checkpoint really uses it (see max_model_len)
    model_type: str = ""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_model_len(self) -> int:
        """Longest context this engine serves exactly: our attention is full (no sliding window), which
        equals sliding-window attention only while the context fits inside the window."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
        config = json.loads(config_file.read_text())
        gen_file = path / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_dict(config, generation)

    @classmethod
    def from_dict(cls, config: dict, generation: dict | None = None) -> "ModelConfig":
        generation = generation or {}
        arch = _architecture(config)
        _check_supported_features(config)
        num_heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        rope_theta, rope_scaling = _rope(config)
        return cls(
            architecture=arch,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden // num_heads),
            intermediate_size=int(config["intermediate_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rope_scaling=rope_scaling,
            # LlamaConfig, MistralConfig and Qwen2Config all default to untied embeddings.
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", arch in _QKV_BIAS_ARCHS)),
            eos_token_ids=_eos_ids(config, generation),
            bos_token_id=generation.get("bos_token_id", config.get("bos_token_id")),
            torch_dtype=config.get("dtype") or config.get("torch_dtype"),
            sliding_window=_sliding_window(config),
            model_type=config.get("model_type", ""),
        )


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    if archs:
        return archs[0]
    model_type = config.get("model_type", "")
    if model_type in _ARCH_BY_MODEL_TYPE:
        return _ARCH_BY_MODEL_TYPE[model_type]
    raise UnsupportedModelError(f"config.json names no architecture (architectures missing, model_type={model_type!r})")


def _check_supported_features(config: dict) -> None:
    """Llama-config switches this engine does not implement: refuse them rather than compute wrong logits."""
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu')")
    if config.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    for key in ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key not in config:
            raise InvalidParameterError(key, "missing from config.json")


def _rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either layout; rope_scaling is None for plain RoPE."""
    params = dict(config.get("rope_parameters") or {})
    params.update(config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise InvalidParameterError("rope_scaling", f"llama3 rope scaling needs {', '.join(missing)}")
    scaling = {"rope_type": "llama3", **{k: float(params[k]) for k in _LLAMA3_KEYS}}
    scaling["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return theta, scaling


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_ids(config: dict, generation: dict) -> list[int]:
    """generation_config.json is what HF generate() stops on; config.json is the fallback."""
    ids = _as_list(generation.get("eos_token_id")) or _as_list(config.get("eos_token_id"))
    return list(dict.fromkeys(ids))


def _sliding_window(config: dict) -> int | None:
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:
        return None
    return int(window)
