"""Perplexity of the engine model on held-out text: exp of the mean next-token negative log-likelihood over
non-overlapping windows (each window starts a fresh sequence; its first token is context only)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .forward import window_logits


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """windows: int64 [num_windows, seq_len] (see calibration.token_windows)."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start:start + batch_size]
        logits = window_logits(model, chunk)
        targets = chunk[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def checkpoint_perplexity(checkpoint_dir, windows: torch.Tensor, device: str = "cpu") -> float:
    """Loads a (quantized or float) checkpoint into the engine model with the torch reference ops (float32 on
    CPU) and returns its perplexity on `windows`."""
    from backend.engine.checkpoint import load_model
    from backend.engine.ops import select_ops

    ops = select_ops("auto", torch.device(device).type)
    model, _ = load_model(checkpoint_dir, ops, "auto", device)
    return perplexity(model, windows)
