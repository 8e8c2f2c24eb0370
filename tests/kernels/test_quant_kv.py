"""Quantized KV cache (int8 with a per-(token, head) scale, fp8 e4m3): the int8 layout (aligned code rows, scales
apart), the cache write and the paged attention kernels against the torch references, which dequantize the
cache and run the float attention."""
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
    ([(37, 1), (5, 1), (70, 1)], 5, 1, 80, 8),                   # odd: D = 80 (masked to 128), group 5, 8-token blocks
    ([(23, 23), (50, 13), (3, 1)], 6, 3, 40, 32),               # odd: D = 40 (8-byte rows), 3 KV heads, 32-token blocks
]
if ON_GPU:
    CASES += [([(1, 1), (2000, 1), (513, 1)], 32, 8, 128, 16), ([(777, 777), (300, 77), (1025, 1)], 32, 8, 128, 16),
              ([(300 + 7 * i, 1) for i in range(70)], 32, 8, 128, 16)]


def quant_batch(seqs, hkv, head_dim, block_size, kind, device):
    float_cache, meta = make_batch(seqs, hkv, head_dim, block_size, torch.float32, device)
    return kq.quantize_cache_ref(float_cache, kind), meta


@pytest.mark.parametrize("kind,tol", [("int8", 0.01), ("fp8", 0.06)])
def test_roundtrip_error(kind, tol, device):
    x = torch.randn(50, 4, 64, device=device) * 3
    codes, scale = kq.quantize_kv_ref(x, kq.KV_DTYPES[kind])
    assert codes.shape == x.shape and (scale is None) == (kind == "fp8")
    back = kq.dequantize_kv_ref(codes, scale)
    assert float((back - x).norm() / x.norm()) < tol
    cache = kq.quantize_cache_ref(x.view(2, 5, 5, 4, 64), kind)  # whole caches, through the layout
    assert float((kq.dequantize_cache_ref(cache) - x.view(2, 5, 5, 4, 64)).norm() / x.norm()) < tol


@pytest.mark.parametrize("num_blocks,block_size,hkv,head_dim", [(3, 16, 8, 128), (5, 8, 1, 80), (2, 32, 3, 40)])
def test_int8_layout(num_blocks, block_size, hkv, head_dim, device):
    cache = kq.allocate_kv_cache("int8", num_blocks, block_size, hkv, head_dim, device)
    assert cache.shape == (2, num_blocks, block_size, hkv, head_dim) and cache.dtype == torch.int8
    # the same bytes as the old [..., D + 2] rows: D codes + a 2-byte scale per (token, head)
    nbytes = cache.untyped_storage().nbytes()
    assert nbytes == 2 * num_blocks * block_size * hkv * kq.bytes_per_head("int8", head_dim)
    # every code row starts on a 16-byte boundary when D does (what the attention kernels' vector loads need)
    if head_dim % 16 == 0:
        assert cache.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in cache.stride()[:-1])
    # codes and scales tile the buffer exactly, without overlap
    raw = torch.empty(0, dtype=torch.int8, device=device).set_(cache.untyped_storage())
    cache.fill_(1)
    assert int((raw == 1).sum()) == cache.numel()
    scales = kq.int8_scales(cache)
    assert scales.shape == (2, num_blocks, hkv, block_size) and scales.dtype == torch.float16
    scales.view(torch.int16).fill_(0x0C0C)
    assert int((raw == 1).sum()) == cache.numel() and int((raw == 0x0C).sum()) == 2 * scales.numel()
    # (token, head) -> its scale: written through the view, read back where the kernels look
    cache.zero_()
    scales[1, num_blocks - 1, hkv - 1, block_size - 1] = 2.0
    block = block_size * hkv * (head_dim + 2)
    at = (2 * num_blocks - 1) * block + block_size * hkv * head_dim + 2 * ((hkv - 1) * block_size + block_size - 1)
    assert raw[at:at + 2].view(torch.float16).item() == 2.0
    # slices of blocks keep the layout; copies lose the scales and are refused
    kq.check_int8_layout(cache[:, 1:])
    for bad in (cache.contiguous(), torch.zeros(cache.shape, dtype=torch.int8, device=device)):
        with pytest.raises(ValueError, match="allocate_kv_cache"):
            kq.int8_scales(bad)


def test_int8_cache_holds_about_twice_the_blocks():
    # a block of 16 tokens x 8 KV heads x D 128: the int8 cache's allocation (codes + scales) against bf16's
    int8_block = kq.allocate_kv_cache("int8", 1, 16, 8, 128).untyped_storage().nbytes()
    bf16_block = torch.zeros(2, 1, 16, 8, 128, dtype=torch.bfloat16).untyped_storage().nbytes()
    budget = 1000 * bf16_block
    assert budget // int8_block >= 1.9 * (budget // bf16_block)


def test_tokens_per_budget_double():
    # bytes per (token, head) against a 16-bit cache: fp8 exactly half, int8 half plus the 2-byte scale
    assert kq.bytes_per_head("fp8", 128) * 2 == 128 * 2
    assert 128 * 2 / kq.bytes_per_head("int8", 128) > 1.96


@pytest.mark.parametrize("hq,hkv,D,bs", [(6, 2, 32, 16), (5, 1, 80, 8), (6, 3, 40, 32)])
@pytest.mark.parametrize("kind", ["int8", FP8_WRITE])
def test_rotary_and_quantized_cache_write(kind, hq, hkv, D, bs, device):
    T = 7
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=device)
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    q, k, v = q.view(T, hq, D), k.view(T, hkv, D), v.view(T, hkv, D)
    positions = torch.arange(3, 3 + T, device=device)
    cos_sin = torch.randn(64, D, device=device)
    slots = torch.tensor([5, 9, -1, 17, 40, 2, 33], device=device)  # -1: a padding row writes nothing
    num_blocks = 45 // bs + 1
    got_cache = kq.allocate_kv_cache(kind, num_blocks, bs, hkv, D, device)
    want_cache = kq.allocate_kv_cache(kind, num_blocks, bs, hkv, D, device)
    got_q, got_k = kq.rotary_and_cache_quant_triton(q, k, v, positions, cos_sin, got_cache, slots)
    keep = slots >= 0
    want_q, want_k = kq.rotary_and_cache_quant_ref(q, k, v, positions, cos_sin, want_cache, torch.where(keep, slots, 0))
    want_cache = kq.allocate_kv_cache(kind, num_blocks, bs, hkv, D, device)  # again, without the padding row
    kq.write_kv_cache_quant_ref(want_k[keep], v[keep], want_cache, slots[keep])
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
    if kind == "int8":  # the scales land where the reference puts them (bit-exact: same float16 rounding)
        torch.testing.assert_close(kq.int8_scales(got_cache), kq.int8_scales(want_cache), atol=0, rtol=0)
    got, want = kq.dequantize_cache_ref(got_cache), kq.dequantize_cache_ref(want_cache)
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
