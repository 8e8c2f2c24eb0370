"""Driving the engine model over plain [batch, seq_len] token windows (calibration and perplexity), outside the
scheduler: each window is one sequence prefilled at once into a small paged cache of its own."""
from __future__ import annotations

import torch

from backend.engine.attention_metadata import AttentionMetadata

BLOCK_SIZE = 16


def prefill_meta(batch: int, seq_len: int, device) -> AttentionMetadata:
    """Sequence b owns blocks [b * n, (b + 1) * n) and its tokens are rows [b * L, (b + 1) * L)."""
    n = -(-seq_len // BLOCK_SIZE)
    tables = torch.arange(batch * n, dtype=torch.int32).view(batch, n)
    pos = torch.arange(seq_len)
    slots = (tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE).flatten()
    starts = [b * seq_len for b in range(batch + 1)]
    return AttentionMetadata(
        slot_mapping=slots.to(device), query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), seq_len, dtype=torch.int32, device=device), block_tables=tables.to(device),
        max_query_len=seq_len, max_seq_len=seq_len, query_start_loc_cpu=starts, seq_lens_cpu=[seq_len] * batch)


def kv_cache_for(model, batch: int, seq_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    cfg = model.config
    blocks = batch * -(-seq_len // BLOCK_SIZE)
    return torch.zeros(2, blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    weight = model.model.embed_tokens.weight
    return weight.device, weight.dtype


@torch.inference_mode()
def window_logits(model, windows: torch.Tensor, kv_caches: list[torch.Tensor] | None = None) -> torch.Tensor:
    """[B, L] token ids -> float32 logits [B, L, V] of the whole model."""
    device, dtype = model_device_dtype(model)
    B, L = windows.shape
    meta = prefill_meta(B, L, device)
    if kv_caches is None:
        kv_caches = [kv_cache_for(model, B, L, dtype, device) for _ in model.model.layers]
    positions = torch.arange(L, device=device).repeat(B)
    hidden = model(windows.to(device).flatten(), positions, meta, kv_caches)
    return model.compute_logits(hidden).view(B, L, -1)


class LayerRunner:
    """Runs calibration windows through the decoder one layer at a time, keeping the hidden state between
    layers, so a quantizer can look at a layer's inputs, change its weights, and move on with the outputs of
    the changed layer (what GPTQ and AWQ do)."""

    def __init__(self, model, windows: torch.Tensor):
        self.model = model
        device, dtype = model_device_dtype(model)
        B, L = windows.shape
        self.meta = prefill_meta(B, L, device)
        self.positions = torch.arange(L, device=device).repeat(B)
        self.kv_cache = kv_cache_for(model, B, L, dtype, device)
        with torch.inference_mode():
            self.x = model.model.embed_tokens(windows.to(device).flatten())
        self.residual: torch.Tensor | None = None

    @torch.inference_mode()
    def run(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index` on the current state; returns (x, residual) without moving on."""
        layer = self.model.model.layers[index]
        return layer(self.x, self.residual, self.positions, self.model.cos_sin_cache, self.kv_cache, self.meta)

    def advance(self, index: int) -> None:
        self.x, self.residual = self.run(index)


def capture_inputs(runner: LayerRunner, index: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Runs layer `index` once and returns the input activations [T, K] of the named submodules."""
    layer = runner.model.model.layers[index]
    captured: dict[str, torch.Tensor] = {}
    hooks = [layer.get_submodule(name).register_forward_hook(
        lambda _m, args, _out, name=name: captured.__setitem__(name, args[0].detach()))
        for name in names]
    try:
        runner.run(index)
    finally:
        for hook in hooks:
            hook.remove()
    return captured
