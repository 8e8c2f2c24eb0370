import pytest
import torch

from backend.kernels.rotary import apply_rotary_ref, rotary_and_cache_ref, rotary_and_cache_triton
ON_GPU = torch.cuda.is_available()

DTYPES = [(torch.bfloat16, 2e-2, 2e-2), (torch.float16, 2e-3, 2e-3)] if ON_GPU else \
    [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
# (tokens, Hq, Hkv, head_dim, block_size)
SHAPES = [(1, 4, 4, 16, 16), (7, 6, 2, 32, 16), (19, 9, 3, 24, 32)] + \
    ([(333, 32, 8, 128, 16), (1000, 9, 3, 64, 32), (77, 6, 2, 128, 32)] if ON_GPU else [])


def cos_sin_cache(max_pos: int, head_dim: int, device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(device)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("tokens,hq,hkv,head_dim,block_size", SHAPES)
def test_rotary_and_cache(tokens, hq, hkv, head_dim, block_size, dtype, atol, rtol, device):
    # q, k, v as views of a fused qkv projection output, as the model produces them.
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=device)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], -1))
    cache = cos_sin_cache(4096, head_dim, device)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    num_blocks = (tokens + block_size - 1) // block_size + 3
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    kv_cache = torch.randn(2, num_blocks, block_size, hkv, head_dim, dtype=dtype, device=device)
    kv_ref = kv_cache.clone()
    out_q = torch.full((tokens, hq, head_dim), float("nan"), dtype=dtype, device=device)
    out_k = torch.full((tokens, hkv, head_dim), float("nan"), dtype=dtype, device=device)

    q_rot, k_rot = rotary_and_cache_triton(q, k, v, positions, cache, kv_cache, slots, out_q=out_q, out_k=out_k)

    ref_q, ref_k = rotary_and_cache_ref(q, k, v, positions, cache, kv_ref, slots)
    cache64 = cache.double()
    torch.testing.assert_close(q_rot.double(), apply_rotary_ref(q.double(), positions, cache64), atol=atol, rtol=rtol)
    torch.testing.assert_close(k_rot.double(), apply_rotary_ref(k.double(), positions, cache64), atol=atol, rtol=rtol)
    torch.testing.assert_close(q_rot, ref_q, atol=atol, rtol=rtol)
    # The cache holds exactly the returned k and the given v; every other slot is untouched.
    flat = kv_cache.view(2, -1, hkv, head_dim)
    assert torch.equal(flat[0, slots], k_rot) and torch.equal(flat[1, slots], v)
    untouched = torch.ones(flat.shape[1], dtype=torch.bool, device=device)
    untouched[slots] = False
    assert torch.equal(flat[:, untouched], kv_ref.view(2, -1, hkv, head_dim)[:, untouched])
    torch.testing.assert_close(kv_cache, kv_ref, atol=atol, rtol=rtol)


def test_negative_slot_skips_cache_write(device):
    q = torch.randn(3, 2, 16, device=device)
    k, v = torch.randn(3, 1, 16, device=device), torch.randn(3, 1, 16, device=device)
    kv_cache = torch.randn(2, 2, 16, 1, 16, device=device)
    before = kv_cache.clone()
    slots = torch.tensor([5, -1, 7], device=device)
    rotary_and_cache_triton(q, k, v, torch.arange(3, device=device), cos_sin_cache(8, 16, device), kv_cache, slots)
    flat, flat_before = kv_cache.view(2, -1, 1, 16), before.view(2, -1, 1, 16)
    keep = torch.ones(32, dtype=torch.bool, device=device)
    keep[[5, 7]] = False
    assert torch.equal(flat[:, keep], flat_before[:, keep])
    assert torch.equal(flat[1, [5, 7]], v[[0, 2]])
