"""Rotating the residual stream before INT4 GPTQ: the float model is unchanged, its weights quantize better.

A decoder of this family (pre-norm RMSNorm, residual adds) computes the same logits when its residual stream is
multiplied by any orthogonal Q: RMSNorm commutes with Q once its weight has been folded into the projections that
read it, so the embedding becomes E Q, every projection reading the stream W Q (q/k/v, gate/up, the LM head) and
every projection writing it Q^T W (o, down). Nothing is added at run time. The rotated weights are incoherent
(no channel stands out, and the bundled model's Q4_1 grid no longer lines up with the INT4 groups, which an
integer zero point cannot follow), and GPTQ rounds them with far less error. The idea is QuaRot's (Ashkboos et
al., 2024) fused rotation, with its randomized Hadamard; SpinQuant (Liu et al., 2024) measures how much the
choice of rotation matters. Only the fused residual rotation is used here: the online Hadamards QuaRot adds
before o_proj and down_proj would need a kernel of their own in the decode step.

A tied LM head cannot stay tied: the embedding becomes E Q and the head diag(final norm) E Q, so the rotated
checkpoint stores its head (tie_word_embeddings false).
"""
from __future__ import annotations

import torch
from torch import nn

_SYLVESTER_2 = ((1.0, 1.0), (1.0, -1.0))


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j - i) mod the prime q."""
    squares = {x * x % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int) -> torch.Tensor | None:
    """An unnormalized Hadamard matrix of order m by Paley's constructions (I: m - 1 a prime = 3 mod 4; II:
    m / 2 - 1 a prime = 1 mod 4), or None. Prime orders only: enough for the hidden sizes of this family."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        core = torch.zeros(m, m, dtype=torch.float64)  # skew conference matrix
        core[0, 1:], core[1:, 0], core[1:, 1:] = 1.0, -1.0, _jacobsthal(m - 1)
        return core + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # symmetric
        conference[0, 1:], conference[1:, 0], conference[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        plus = torch.tensor(_SYLVESTER_2, dtype=torch.float64)
        minus = torch.tensor(((1.0, -1.0), (-1.0, -1.0)), dtype=torch.float64)
        return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)
    return None


def _hadamard_core(n: int) -> tuple[int, torch.Tensor] | None:
    """(k, M): n = 2^k m with M an unnormalized Hadamard matrix of order m (1 or Paley's), largest k first."""
    for k in range(n.bit_length(), -1, -1):
        if n % (1 << k):
            continue
        m = n >> k
        core = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if core is not None:
            return k, core
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """An orthonormal Hadamard matrix of order n (float64, entries +-1/sqrt(n)) as 2^k Sylvester doublings of
    1 or of a Paley matrix (576 = 2^4 x 36, 960 = 2^4 x 60, 3072 = 2^8 x 12, ...), or None when n has none here."""
    found = _hadamard_core(n)
    if found is None:
        return None
    k, matrix = found
    for _ in range(k):
        matrix = torch.kron(torch.tensor(_SYLVESTER_2, dtype=torch.float64), matrix)
    return matrix / n ** 0.5


def rotation_kind(n: int) -> str:
    """What residual_rotation(n) gives, without building it."""
    return "random_orthogonal" if _hadamard_core(n) is None else "randomized_hadamard"


def residual_rotation(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(Q [n, n] float64 orthogonal, its kind): a Hadamard matrix with random row signs (QuaRot's randomized
    Hadamard), or a random orthogonal matrix where no Hadamard of order n is built here."""
    gen = torch.Generator().manual_seed(seed)
    hadamard = hadamard_matrix(n)
    if hadamard is not None:
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return signs[:, None] * hadamard, "randomized_hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), "random_orthogonal"


@torch.no_grad()
def rotate_residual_stream(model: nn.Module, Q: torch.Tensor, progress: bool = False) -> None:
    """Rotates a loaded float LlamaForCausalLM (not tensor-parallel) in place by the orthogonal Q: the norms'
    weights are folded into the projections after them (and become ones), a tied head becomes its own
    parameter, and the weights are multiplied by Q in float64 (minutes for an 8B model on a CPU, hence the
    progress bar)."""
    from tqdm.auto import tqdm

    stack = model.model
    Q = Q.to(stack.embed_tokens.weight.device)
    if model.lm_head is None:  # tied: the head is a copy of the embedding from here on
        embedding = stack.embed_tokens.weight
        model.lm_head = nn.Linear(embedding.shape[1], embedding.shape[0], bias=False,
                                  device=embedding.device, dtype=embedding.dtype)
        model.lm_head.weight.copy_(embedding)
        model.config.tie_word_embeddings = False
    _fold_norm(stack.norm, model.lm_head)
    _reads_stream(stack.embed_tokens, Q)  # its rows are stream vectors, like a reader's rows
    _reads_stream(model.lm_head, Q)
    for layer in tqdm(stack.layers, desc="rotating the residual stream", unit="layer", disable=not progress):
        _fold_norm(layer.input_layernorm, layer.self_attn.qkv_proj)
        _fold_norm(layer.post_attention_layernorm, layer.mlp.gate_up_proj)
        _reads_stream(layer.self_attn.qkv_proj, Q)
        _reads_stream(layer.mlp.gate_up_proj, Q)
        _writes_stream(layer.self_attn.o_proj, Q)
        _writes_stream(layer.mlp.down_proj, Q)


def _fold_norm(norm: nn.Module, reader: nn.Linear) -> None:
    reader.weight.mul_(norm.weight[None, :].to(reader.weight.dtype))
    norm.weight.fill_(1.0)


def _reads_stream(module: nn.Module, Q: torch.Tensor) -> None:
    """y = x W^T with x rotated to x Q: W becomes W Q."""
    module.weight.copy_((module.weight.double() @ Q).to(module.weight.dtype))


def _writes_stream(linear: nn.Linear, Q: torch.Tensor) -> None:
    """The output y becomes y Q: W becomes Q^T W and a bias b becomes b Q."""
    linear.weight.copy_((Q.T @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() @ Q).to(linear.bias.dtype))
