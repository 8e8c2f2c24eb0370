"""Rotary position embedding (rotate-half / NeoX layout, as in HF Llama), fused with the write of K and V
into the paged KV cache."""
from __future__ import annotations

import torch


def apply_rotary_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; positions: [T]; cos_sin_cache: [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2]), float32."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin_cache[positions].unsqueeze(1).float().split(half, dim=-1)
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> kv_cache [2, num_blocks, block_size, Hkv, D] at the flat slots given."""
    flat = kv_cache.view(2, -1, *kv_cache.shape[-2:])
    flat[0, slot_mapping] = k.to(kv_cache.dtype)
    flat[1, slot_mapping] = v.to(kv_cache.dtype)


def rotary_and_cache_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place of a copy, writes rotated k and v into the cache; returns (q, k)."""
    q = apply_rotary_ref(q, positions, cos_sin_cache)
    k = apply_rotary_ref(k, positions, cos_sin_cache)
    write_kv_cache_ref(k, v, kv_cache, slot_mapping)
    return q, k
