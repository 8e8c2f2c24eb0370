"""The RMSNorm kernel that emits per-token quantized rows for a W8A8 product, against its torch reference
(interpreter on CPU: int8 only, its e4m3 cast is wrong; both kinds on the GPU); and a W8A8 model whose norms
quantize (the fusion) against the same model quantizing in each projection."""
import pytest
import torch

from backend.kernels.rms_norm import rms_norm_quant_ref, rms_norm_quant_triton

ON_GPU = torch.cuda.is_available()
KINDS = ["int8", pytest.param("fp8", marks=pytest.mark.skipif(not ON_GPU, reason="interpreter's e4m3 cast"))]
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]


def assert_codes_close(got, want, kind):
    """Scales equal to float32 rounding; codes equal but for ties rounded the other way (one int8 step) or the
    last e4m3 bit, on under 1% of the values."""
    (codes, scales), (ref_codes, ref_scales) = got, want
    torch.testing.assert_close(scales, ref_scales, rtol=1e-5, atol=0)
    diff = (codes.float() - ref_codes.float()).abs() / ref_codes.float().abs().clamp(min=1)
    assert diff.max() <= (1.0 if kind == "int8" else 0.125)
    assert (diff > 0).sum() <= max(1, 0.01 * diff.numel())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,hidden,with_residual", [(1, 64, False), (7, 576, True), (33, 1000, True)])
def test_rms_norm_quant(rows, hidden, with_residual, kind, dtype, device):
    x = torch.randn(rows, hidden, dtype=dtype, device=device) * 3
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.rand(hidden, dtype=dtype, device=device) + 0.5
    got, summed = rms_norm_quant_triton(x, weight, 1e-6, residual, kind)
    want, ref_sum = rms_norm_quant_ref(x, weight, 1e-6, residual, kind)
    assert torch.equal(summed, ref_sum)
    assert_codes_close(got, want, kind)


@pytest.mark.parametrize("method", ["int8_sq", pytest.param("fp8", marks=pytest.mark.skipif(
    not ON_GPU, reason="interpreter's e4m3 cast"))])
def test_w8a8_model_with_fused_quantization(method, device, tmp_path):
    """A W8A8 tiny Llama on the Triton path, its norms quantizing (the fusion): logits against the same model
    whose norms quantize through the torch reference (the same codes but for rare rounding ties, so far closer
    than the quantization error itself), and as close to the float model as with a quantizer in each
    projection (the separate path, which quantizes the norm's output after rounding it to the model dtype)."""
    import dataclasses

    from backend.engine.checkpoint import load_model
    from backend.engine.quantization import quantize_model_
    from backend.engine.quantization.forward import window_logits
    from backend.engine.quantization.layers import fuse_activation_quantization
    from backend.kernels.triton_ops import TRITON_OPS

    from tests.tiny_models import make_tiny_checkpoint

    # float32 activations: in bf16 this tiny random model (init scale 0.1) turns the rare rounding-tie flips
    # into logit differences of half the quantization error (measured on an H100), which would hide real faults
    dtype = torch.float32
    model, _ = load_model(make_tiny_checkpoint("llama", tmp_path / "ckpt"), TRITON_OPS, dtype, device)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    float_logits = window_logits(model, ids)
    quantize_model_(model, method, TRITON_OPS)
    norms = [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert {n.output_kind for n in norms} == {"int8" if method == "int8_sq" else "fp8"}
    fused = window_logits(model, ids)
    for norm in norms:
        norm.ops = dataclasses.replace(TRITON_OPS, rms_norm_quant=rms_norm_quant_ref)
    reference = window_logits(model, ids)
    for norm in norms:
        norm.ops, norm.output_kind = TRITON_OPS, None
    separate = window_logits(model, ids)
    assert fuse_activation_quantization(model) == len(norms)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())
    quant_error = rel(separate, float_logits)
    assert quant_error > 1e-3  # so the comparison below can tell a fused path that mangles the codes apart
    assert rel(fused, reference) < quant_error / 5, (rel(fused, reference), quant_error)
    assert rel(fused, float_logits) < 1.5 * quant_error, (rel(fused, float_logits), quant_error)
