"""Quantized KV cache (int8 with a per-(token, head) scale, fp8 e4m3): the cache write and the paged attention
kernels against the torch references, which dequantize the cache and run the float attention."""
import pytest
import torch

from backend.kernels import kv_quant as kq
from tests.kernels.test_paged_attention import make_batch

ON_GPU = torch.cuda.is_available()
DTYPES = [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)] if ON_GPU else [(torch.float32, 1e-4), (torch.float16, 4e-3)]
# The interpreter casts float32 -> e4m3 wrongly (see test_quant_scaled_matmul.py): fp8 *writes* run on GPU only.
FP8_WRITE = pytest.param("fp8", marks=pytest.mark.skipif(not ON_GPU, reason="interpreter's e4m3 cast is wrong"))
CASES = [
    ([(17, 1), (33, 1), (130, 1)], 6, 2, 32, 16),                # decode (split + shared reduce)
    ([(30, 30), (45, 1), (64, 9), (5, 1)], 9, 3, 64, 16),       # prefill, chunk and decode rows in one launch
    ([(9 + 7 * i, 1) for i in range(8)], 6, 2, 32, 16),          # one split on CPU (8 x 2 programs): no reduce
]
if ON_GPU:
    CASES += [([(1, 1), (2000, 1), (513, 1)], 32, 8, 128, 16), ([(777, 777), (300, 77), (1025, 1)], 32, 8, 128, 16),
              ([(300 + 7 * i, 1) for i in range(70)], 32, 8, 128, 16)]


def quant_batch(seqs, hkv, head_dim, block_size, kind, device):
    float_cache, meta = make_batch(seqs, hkv, head_dim, block_size, torch.float32, device)
    return kq.quantize_kv_ref(float_cache, kq.KV_DTYPES[kind]), meta


@pytest.mark.parametrize("kind,tol", [("int8", 0.01), ("fp8", 0.06)])
def test_roundtrip_error(kind, tol, device):
    x = torch.randn(50, 4, 64, device=device) * 3
    packed = kq.quantize_kv_ref(x, kq.KV_DTYPES[kind])
    assert packed.shape[-1] == kq.cache_head_size(kind, 64)
    back = kq.dequantize_kv_ref(packed, 64)
    assert float((back - x).norm() / x.norm()) < tol


def test_tokens_per_budget_double():
    # bytes per (token, head) against a 16-bit cache: fp8 exactly half, int8 half plus the 2-byte scale
    assert kq.bytes_per_head("fp8", 128) * 2 == 128 * 2
    assert 128 * 2 / kq.bytes_per_head("int8", 128) > 1.96


@pytest.mark.parametrize("kind", ["int8", FP8_WRITE])
def test_rotary_and_quantized_cache_write(kind, device):
    T, hq, hkv, D, bs = 7, 6, 2, 32, 16
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=device)
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    q, k, v = q.view(T, hq, D), k.view(T, hkv, D), v.view(T, hkv, D)
    positions = torch.arange(3, 3 + T, device=device)
    cos_sin = torch.randn(64, D, device=device)
    slots = torch.tensor([5, 9, -1, 17, 40, 2, 33], device=device)  # -1: a padding row writes nothing
    shape = (2, 4, bs, hkv, kq.cache_head_size(kind, D))
    got_cache = torch.zeros(shape, dtype=kq.KV_DTYPES[kind], device=device)
    want_cache = torch.zeros(shape, dtype=kq.KV_DTYPES[kind], device=device)
    got_q, got_k = kq.rotary_and_cache_quant_triton(q, k, v, positions, cos_sin, got_cache, slots)
    keep = slots >= 0
    want_q, want_k = kq.rotary_and_cache_quant_ref(q, k, v, positions, cos_sin, want_cache, torch.where(keep, slots, 0))
    kq.write_kv_cache_quant_ref(torch.zeros_like(k[:1]), torch.zeros_like(v[:1]), want_cache, torch.tensor([0]))
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
    got, want = kq.dequantize_kv_ref(got_cache, D), kq.dequantize_kv_ref(want_cache, D)
    step = want.abs().amax(dim=-1, keepdim=True) / 127  # one code step (ties may round apart)
    assert ((got - want).abs() <= step + 1e-6).all()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("seqs,hq,hkv,head_dim,block_size", CASES)
def test_attention_on_quantized_cache(seqs, hq, hkv, head_dim, block_size, dtype, tol, kind, device):
    cache, meta = quant_batch(seqs, hkv, head_dim, block_size, kind, device)
    q = torch.randn(meta.query_start_loc_cpu[-1], hq, head_dim, dtype=dtype, device=device)
    got = kq.paged_attention_quant_triton(q, cache, meta, head_dim ** -0.5)
    want = kq.paged_attention_quant_ref(q.float(), cache, meta, head_dim ** -0.5)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
