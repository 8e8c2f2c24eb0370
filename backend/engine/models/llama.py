"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in plain PyTorch, gpt-fast style.

The fused operations (RMSNorm + residual, RoPE + KV-cache write, paged attention, SiLU-and-mul) come from
the KernelOps given at construction, so one model runs on the torch references or on the Triton kernels.
Projections are plain nn.Linear modules (a quantization pass can swap them); q/k/v are one fused linear
[q | k | v] and gate/up one fused linear [gate | up], filled from the HF per-projection weights at load.

Tensor parallelism (`tp`, a backend.engine.parallel.group.ParallelGroup): the model is built from the rank's
slice of the config (parallel/sharding.py: heads and MLP columns over the ranks) and loaded from the rank's
slices of the weights; the only changes here are an all-reduce after o_proj and down_proj, and a
vocab-parallel lm_head whose logits are gathered.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
import torch.nn.functional as F

from backend.engine.attention_metadata import AttentionMetadata
from backend.engine.model_config import ModelConfig
from backend.engine.ops import KernelOps


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with Llama 3.1 scaling when asked."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_scaling is None:
        return inv_freq
    return _llama3_scale(inv_freq, rope_scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than old_len / low_freq_factor are stretched by `factor`, shorter than
    old_len / high_freq_factor are kept, and the band between is interpolated smoothly."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def compute_cos_sin_cache(head_dim: int, theta: float, max_positions: int,
                          rope_scaling: dict | None = None) -> torch.Tensor:
    """[max_positions, head_dim] float32 = cat(cos, sin) of the head_dim / 2 rotation angles."""
    inv_freq = rope_inv_freq(head_dim, theta, rope_scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # x: hidden rows, or (codes, scales) from a quantizing norm
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if meta.decode_only and self.ops.rotary_decode_attention is not None:
            out = self.ops.rotary_decode_attention(q, k, v, positions, cos_sin_cache, kv_cache, meta, self.scale)
        else:
            q, _ = self.ops.rotary_and_cache(q, k, v, positions, cos_sin_cache, kv_cache, meta.slot_mapping)
            out = self.ops.paged_attention(q, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(T, self.q_size))  # under tp a partial sum: the next norm reduces it


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode row's GEMV applies SiLU-and-mul in its epilogue (gemv.GemvLinear, the quantized layers).
        fused = getattr(self.gate_up_proj, "silu_and_mul_decode", None)
        h = fused(x) if fused is not None else None
        if h is None:
            h = self.ops.silu_and_mul(self.gate_up_proj(x))
        return self.down_proj(h)  # under tp a partial sum, as above


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: KernelOps, tp=None):
        super().__init__()
        self.ops, self.eps, self.tp = ops, eps, tp
        self.weight = nn.Parameter(torch.ones(size))
        self.output_kind: str | None = None  # set by quantization.layers.fuse_activation_quantization

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, reduce: bool = False) -> tuple:
        """(norm(x + residual), x + residual): the residual add of the previous sublayer is fused in. With an
        output_kind, the first item is the norm quantized per token for the W8A8 projection that reads it.
        reduce: x is a row-parallel layer's partial sum on each tensor-parallel rank; it is summed over the ranks
        first, by one kernel together with the add and the norm where the group has it (decode rows)."""
        if reduce and self.tp is not None:
            fused = None if self.output_kind else self.tp.fused_all_reduce_rms_norm(x, residual, self.weight,
                                                                                   self.eps)
            if fused is not None:
                return fused
            x = self.tp.all_reduce_(x)
        if self.output_kind:
            return self.ops.rms_norm_quant(x, self.weight, self.eps, residual, self.output_kind)
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, tp)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, tp)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, residual, positions, cos_sin_cache, kv_cache, meta):
        """x is the previous sublayer's output, not yet added to residual (None before the first layer, where x
        is the embedding: whole on every rank, while every sublayer's output is a partial sum under tp)."""
        h, residual = self.input_layernorm(x, residual, reduce=residual is not None)
        h = self.self_attn(h, positions, cos_sin_cache, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual, reduce=True)
        return self.mlp(h), residual


class DecoderStack(nn.Module):
    """Named like HF's `model.` submodule so that parameter names line up with checkpoint names."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, tp)


def _lm_head(cfg: ModelConfig, tp) -> nn.Linear | None:
    """None when tied (the embedding is the head); under tp, this rank's slice of the vocabulary, tied or not."""
    if tp is not None:
        from backend.engine.parallel.sharding import vocab_shard_size

        return nn.Linear(cfg.hidden_size, vocab_shard_size(cfg.vocab_size, tp.world_size), bias=False)
    return None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


# HF projection name -> (our fused parameter's module, shard index). Shards are laid out in this order.
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp=None):
        super().__init__()
        self.config, self.ops, self.tp = cfg, ops, tp
        self.model = DecoderStack(cfg, ops, tp)
        self.lm_head = _lm_head(cfg, tp)
        self.register_buffer("cos_sin_cache", torch.empty(cfg.max_model_len, cfg.head_dim), persistent=False)
        self.logits_linear = F.linear  # backend/kernels/gemv.py swaps in its batch-1 kernel on the GPU

    def init_rotary(self) -> None:
        """Fill the float32 cos/sin table on the model's device (called after the model is materialized)."""
        cfg = self.config
        table = compute_cos_sin_cache(cfg.head_dim, cfg.rope_theta, cfg.max_model_len, cfg.rope_scaling)
        self.cos_sin_cache = table.to(self.model.norm.weight.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, H]."""
        x, residual = self.model.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, self.cos_sin_cache, kv_cache, meta)
        x, _ = self.model.norm(x, residual, reduce=True)
        return x

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """[N, H] -> logits [N, V], in float32 or (float32=False, for the sampler, which converts only the
        rows that need it) in the model's dtype."""
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):  # quantization/layers.py's
            logits = self.lm_head(hidden)
            return logits.float() if float32 else logits
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.tp is not None:
            logits = self.tp.gather_vocab(F.linear(hidden, weight), self.config.vocab_size)
        else:
            logits = self.logits_linear(hidden, weight)
        return logits.float() if float32 else logits

    # ---- weights -------------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into our parameters, splicing q/k/v and gate/up into their fused linears.

        Raises ValueError naming an unexpected or mis-shaped weight, or listing the missing ones.
        """
        params = dict(self.named_parameters())
        filled: dict[str, set] = {name: set() for name in params}
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints may still store the (identical) head
            target, shard = self._target(name, params)
            dest = self._shard_view(params[target], target, shard)
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            with torch.no_grad():
                dest.copy_(tensor)
            filled[target].add(shard)
        self._check_complete(filled)

    def _target(self, name: str, params: dict) -> tuple[str, int | None]:
        """Our parameter name for an HF weight name, and the shard of it for fused projections."""
        parts = name.split(".")
        target, shard = name, None
        if len(parts) >= 2 and parts[-2] in _FUSED:
            fused, shard = _FUSED[parts[-2]]
            target = ".".join(parts[:-2] + [fused, parts[-1]])
        if target not in params:
            raise ValueError(f"unexpected weight {name!r} for {self.config.architecture} "
                             f"(attention_bias={self.config.attention_bias}, "
                             f"tie_word_embeddings={self.config.tie_word_embeddings})")
        return target, shard

    def _shard_names(self, target: str) -> list[str]:
        """HF projection names stored in a fused parameter, in order; [] for a plain parameter."""
        fused = target.split(".")[-2]
        return [hf for hf, (f, _) in _FUSED.items() if f == fused]

    def _shard_view(self, param: torch.Tensor, target: str, shard: int | None) -> torch.Tensor:
        if shard is None:
            return param.data
        cfg = self.config
        sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size] if ".qkv_proj." in target else [cfg.intermediate_size] * 2
        return param.data.narrow(0, sum(sizes[:shard]), sizes[shard])

    def _check_complete(self, filled: dict[str, set]) -> None:
        missing = []
        for target, shards in filled.items():
            names = self._shard_names(target)
            if not names and not shards:
                missing.append(target)
            for i, hf in enumerate(names):
                if i not in shards:
                    missing.append(target.replace(target.split(".")[-2], hf))
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:10])}{more}")
