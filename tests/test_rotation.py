"""The residual-stream rotation GPTQ runs on (backend/engine/quantization/rotation.py): its matrices are
orthogonal, and a rotated model computes the logits of the original (engine model against itself, reference
ops, float32), for tied and untied heads and q/k/v biases."""
from __future__ import annotations

import pytest
import torch

from backend.engine.checkpoint import load_model
from backend.engine.ops import REFERENCE_OPS
from backend.engine.quantization.forward import window_logits
from backend.engine.quantization.rotation import hadamard_matrix, residual_rotation, rotate_residual_stream


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 36, 64, 72, 576, 960, 3072])
def test_hadamard_matrix_is_orthonormal_with_equal_magnitudes(n):
    H = hadamard_matrix(n)
    assert H is not None and H.shape == (n, n)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(H.abs(), torch.full_like(H, n ** -0.5), atol=1e-15)


def test_orders_without_a_hadamard_get_a_random_orthogonal_rotation():
    assert hadamard_matrix(6) is None  # no Hadamard matrix of order 6 exists
    Q, kind = residual_rotation(6)
    assert kind == "random_orthogonal"
    assert torch.allclose(Q @ Q.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    Q, kind = residual_rotation(64, seed=3)
    assert kind == "randomized_hadamard" and not torch.equal(Q, residual_rotation(64, seed=4)[0])
    assert torch.equal(Q, residual_rotation(64, seed=3)[0])  # reproducible


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return window_logits(model, tokens).double()


def _load_with_uneven_norms(path):
    """transformers initializes the norms to ones, where folding them would go untested: give them spread."""
    model, _ = load_model(path, REFERENCE_OPS, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "smol"])  # untied; q/k/v biases; tied head, one KV head
def test_rotated_model_computes_the_same_logits(tiny_checkpoint, arch):
    model = _load_with_uneven_norms(tiny_checkpoint(arch))
    tokens = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(model, tokens)
    embedding = model.model.embed_tokens.weight.detach().clone()
    Q, _ = residual_rotation(model.config.hidden_size, seed=1)
    rotate_residual_stream(model, Q)
    after = _logits(model, tokens)
    assert (after - before).norm() / before.norm() < 1e-5
    assert not model.config.tie_word_embeddings and model.lm_head is not None
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert (model.model.embed_tokens.weight - embedding).norm() > 0.5 * embedding.norm()  # the stream moved


def test_a_rotation_that_skips_a_writer_changes_the_logits(tiny_checkpoint):
    """The same check fails when one projection writing the stream is left unrotated, so it can catch a wrong
    fold or a transposed Q."""
    model = _load_with_uneven_norms(tiny_checkpoint("llama"))
    tokens = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    before = _logits(model, tokens)
    Q, _ = residual_rotation(model.config.hidden_size, seed=1)
    down = model.model.layers[1].mlp.down_proj.weight
    saved = down.detach().clone()
    rotate_residual_stream(model, Q)
    with torch.no_grad():
        down.copy_(saved)
    assert (_logits(model, tokens) - before).norm() / before.norm() > 1e-2
