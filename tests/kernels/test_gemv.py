import pytest
import torch

from backend.kernels.gemv import GemvLinear, gemv_ref, gemv_triton, linear_decode, use_gemv_for_decode

ON_GPU = torch.cuda.is_available()
DTYPES = [(torch.bfloat16, 1e-2, 1e-2), (torch.float16, 2e-3, 2e-3)] if ON_GPU else \
    [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
# (N, K): rows not a multiple of BLOCK_N, K shorter than, not a multiple of, and a multiple of BLOCK_K.
SHAPES = [(1, 16), (37, 100), (130, 1536), (64, 1024)] + ([(6144, 4096), (4096, 14336), (1000, 4100)] if ON_GPU else [])
TILES = [(8, 512, 4), (4, 256, 8), (16, 256, 4)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tile", TILES)
def test_gemv_matches_float64(shape, tile, dtype, atol, rtol, device):
    n, k = shape
    weight = torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5
    x = torch.randn(1, k, dtype=dtype, device=device)
    out = gemv_triton(x, weight, tile)
    expected = x.double() @ weight.double().T
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(out, gemv_ref(x, weight), atol=atol, rtol=rtol)


@pytest.mark.parametrize("preload", [False, True])
@pytest.mark.parametrize("eviction", ["", "evict_first"])
@pytest.mark.parametrize("shape", [(37, 100), (130, 1536), (64, 1000)])
def test_gemv_with_and_without_the_first_tile_loaded_before_the_wait(preload, eviction, shape, monkeypatch, device):
    # also with and without evict-first weight loads
    from backend.kernels import _pdl, gemv

    monkeypatch.setattr(_pdl, "preload_first_tile", preload)
    monkeypatch.setattr(gemv, "weight_eviction", eviction)
    weight = torch.randn(*shape, device=device) / 40
    x = torch.randn(1, shape[1], device=device)
    torch.testing.assert_close(gemv_triton(x, weight, (8, 256, 4)).double(), x.double() @ weight.double().T,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", [(2, 16), (74, 100), (260, 1536)] + ([(28672, 4096), (2000, 4100)] if ON_GPU else []))
@pytest.mark.parametrize("tile", TILES)
def test_gated_gemv_is_silu_and_mul_of_the_product(shape, tile, dtype, atol, rtol, device):
    # [gate; up] rows: half-rows not a multiple of the tile's pairs, K off the tile; against float64.
    n, k = shape
    weight = torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5
    x = torch.randn(1, k, dtype=dtype, device=device)
    gate, up = (x.double() @ weight.double().T).chunk(2, dim=-1)
    out = gemv_triton(x, weight, tile, gated=True)
    assert out.shape == (1, n // 2)
    torch.testing.assert_close(out.double(), torch.nn.functional.silu(gate) * up, atol=atol, rtol=rtol)


def test_gemv_linear_fuses_silu_and_mul_only_for_a_decode_row(monkeypatch, device):
    from backend.kernels import gemv

    layer = torch.nn.Linear(64, 96, bias=False).to(device)
    use_gemv_for_decode(layer)
    x = torch.randn(1, 64, device=device, dtype=torch.float16)
    layer.half()
    fused = layer.silu_and_mul_decode(x)
    assert (fused is not None) == (device.type == "cuda")
    if fused is not None:
        gate, up = (x.double() @ layer.weight.double().T).chunk(2, dim=-1)
        torch.testing.assert_close(fused.double(), torch.nn.functional.silu(gate) * up, atol=2e-3, rtol=2e-3)
    assert layer.silu_and_mul_decode(x.expand(2, 64)) is None  # two rows: the unfused path
    monkeypatch.setattr(gemv, "fuse_silu_and_mul", False)
    assert layer.silu_and_mul_decode(x) is None


def test_gemv_rejects_more_than_one_row(device):
    with pytest.raises(ValueError, match="x \\[1, 8\\]"):
        gemv_triton(torch.ones(2, 8, device=device), torch.ones(4, 8, device=device))


def test_gemv_linear_keeps_parameters_and_results():
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3, bias=False))
    x = torch.randn(1, 8)
    before = model(x)
    assert use_gemv_for_decode(model) == 2
    assert isinstance(model[0], GemvLinear) and set(dict(model.named_parameters())) == {"0.weight", "0.bias", "2.weight"}
    torch.testing.assert_close(model(x), before)  # CPU rows take F.linear: identical
    assert linear_decode(torch.randn(3, 8), model[0].weight).shape == (3, 6)


def test_the_logits_hook_is_switched_too():
    model = torch.nn.Module()
    model.logits_linear = torch.nn.functional.linear
    use_gemv_for_decode(model)
    assert model.logits_linear is linear_decode
