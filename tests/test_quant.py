"""Quantized checkpoints on tiny models: the offline pass, the config, loading into the engine model, and the
quantized model against the float model whose weights were quantized and dequantized the same way."""
from __future__ import annotations

import json

import pytest
import torch

from backend.engine.checkpoint import iter_safetensors, load_model
from backend.engine.errors import InvalidParameterError
from backend.engine.ops import REFERENCE_OPS
from backend.engine.quantization import QuantConfig, quantize_checkpoint, quantize_model_
from backend.engine.quantization import layers, rtn
from backend.engine.quantization.forward import window_logits
from tests.tiny_models import make_tiny_checkpoint

RTN_METHODS = ["int8_wo", "int4_wo", "fp8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # hidden 64, intermediate 128: group 32 keeps several groups per row.
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("qtiny") / "ckpt")


def tokens(n=24, vocab=320, seed=0):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def fake_quant_reference(path, method, group):
    """The float model with each projection's weight replaced by its dequantized quantization."""
    model, _ = load_model(path, REFERENCE_OPS, torch.float32, "cpu")
    for name in layers.quantized_linear_names(model):
        linear = model.get_submodule(name)
        w = linear.weight.data
        if method == "int8_wo":
            q, s = rtn.quantize_int8(w)
            linear.weight.data = q.float() * s[:, None]
        elif method == "int4_wo":
            linear.weight.data = rtn.fake_quantize_int4(w, group)
    return model


def test_rtn_int4_error_is_within_half_a_step():
    w = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))  # 3 groups of 32, a short one of 4
    q, s, z = rtn.quantize_int4(w, 32)
    assert q.shape == (8, 100) and s.shape == (8, 4) and q.max() <= 15
    error = (rtn.dequantize_int4_codes(q, s, z, 32) - w).abs()
    step = s.repeat_interleave(32, dim=1)[:, :100]
    # Codes inside 0..15 are rounded: half a step. At the ends the zero point's own rounding can push the
    # group's extreme half a step past the range, where the code is clamped: at most a whole step.
    inside = (q > 0) & (q < 15)
    assert (error[inside] <= step[inside] / 2 + 1e-6).all()
    assert (error <= step + 1e-6).all()


@pytest.mark.parametrize("method", ["int8_wo", "int4_wo"])
def test_quantized_checkpoint_matches_fake_quant_model(tiny, tmp_path, method):
    out = quantize_checkpoint(tiny, tmp_path / method, method, group_size=32, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["method"] == method and config["quant_method"] == "tritium"
    names = dict(iter_safetensors(out))
    assert "model.layers.0.self_attn.q_proj.qweight" in names and "model.layers.0.self_attn.q_proj.weight" not in names
    model, _ = load_model(out, REFERENCE_OPS, torch.float32, "cpu")
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, layers.QuantLinear)
    ids = tokens()
    got = window_logits(model, ids)
    want = window_logits(fake_quant_reference(tiny, method, 32), ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_quantized_logits_error_orders_by_precision(tiny, tmp_path):
    # This random model (init scale 0.1) amplifies weight error a lot, so only the order is asserted:
    # 8-bit integers beat e4m3's 3-bit mantissa, which beats 4-bit integers. Round-to-nearest in place: the fp8
    # method's checkpoint pass is calibrated (GPTQ-rounded weights) and the tiny model has no real tokenizer.
    ids = tokens()
    want = window_logits(load_model(tiny, REFERENCE_OPS, torch.float32, "cpu")[0], ids)
    errors = {}
    for method in RTN_METHODS:
        model, _ = load_model(tiny, REFERENCE_OPS, torch.float32, "cpu")
        quantize_model_(model, method, REFERENCE_OPS, group_size=32)
        got = window_logits(model, ids)
        errors[method] = float((got - want).norm() / want.norm())
    assert errors["int8_wo"] < errors["fp8"] < errors["int4_wo"] < 0.5, errors


def test_weight_bytes_shrink(tiny, tmp_path):
    sizes = {}
    for method in ["int8_wo", "int4_wo"]:
        out = quantize_checkpoint(tiny, tmp_path / method, method, group_size=32, progress=False)
        sizes[method] = sum(t.numel() * t.element_size() for n, t in iter_safetensors(out) if "_proj." in n)
    float_bytes = sum(t.numel() * 2 for n, t in iter_safetensors(tiny) if "_proj." in n)  # as bf16
    assert sizes["int8_wo"] / float_bytes == pytest.approx(0.5, abs=0.02)
    assert sizes["int4_wo"] / float_bytes == pytest.approx(0.25 + 3 / 64, abs=0.01)  # + fp16 scale, zero


def test_in_place_rtn_equals_checkpoint_path(tiny, tmp_path):
    out = quantize_checkpoint(tiny, tmp_path / "q", "int4_wo", group_size=32, progress=False)
    loaded, _ = load_model(out, REFERENCE_OPS, torch.float32, "cpu")
    model, _ = load_model(tiny, REFERENCE_OPS, torch.float32, "cpu")
    quantize_model_(model, "int4_wo", REFERENCE_OPS, group_size=32)
    ids = tokens()
    torch.testing.assert_close(window_logits(model, ids), window_logits(loaded, ids))


def fake_quant_head(model, weight: torch.Tensor) -> None:
    """The reference's LM head: a float nn.Linear holding the dequantized INT8 weight-only head (untied)."""
    q, s = rtn.quantize_int8(weight)
    model.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    model.lm_head.weight.data = q.float() * s[:, None]


@pytest.mark.parametrize("arch", ["llama", "smol"])  # an untied head, and a head tied to the embedding
def test_quantized_lm_head(arch, tmp_path):
    # --quant-lm-head under INT4: the projections in 4 bits, the head in INT8 weight-only (its head_format),
    # quantized from lm_head.weight or, when tied, from the embedding, which stays the float input table.
    src = make_tiny_checkpoint(arch, tmp_path / "src")
    out = quantize_checkpoint(src, tmp_path / "q", "int4_wo", group_size=32, quantize_lm_head=True, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["lm_head"] is True
    names = dict(iter_safetensors(out))
    assert names["lm_head.qweight"].dtype == torch.int8 and "lm_head.weight" not in names
    assert names["model.embed_tokens.weight"].is_floating_point()
    model, _ = load_model(out, REFERENCE_OPS, torch.float32, "cpu")
    assert isinstance(model.lm_head, layers.Int8WeightOnlyLinear)
    reference = fake_quant_reference(src, "int4_wo", 32)
    float_head = reference.model.embed_tokens.weight if reference.lm_head is None else reference.lm_head.weight
    fake_quant_head(reference, float_head.data.clone())
    ids = tokens(vocab=int(float_head.shape[0]))
    got, want = window_logits(model, ids), window_logits(reference, ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    # The quantized head does change the logits (the comparison above could fail): the float head differs.
    unquantized_head = fake_quant_reference(src, "int4_wo", 32)
    assert (window_logits(unquantized_head, ids) - want).abs().max() > 1e-3
    # Round-to-nearest in place (dummy weights in benchmarks) builds the same model.
    in_place, _ = load_model(src, REFERENCE_OPS, torch.float32, "cpu")
    quantize_model_(in_place, "int4_wo", REFERENCE_OPS, group_size=32, lm_head=True)
    torch.testing.assert_close(window_logits(in_place, ids), got)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(InvalidParameterError, match="quant"):
        QuantConfig.for_method("int3")
    with pytest.raises(InvalidParameterError, match="group_size"):
        QuantConfig.for_method("int4_wo", group_size=100)
    with pytest.raises(InvalidParameterError, match="quantization_config"):
        QuantConfig.from_dict({"quant_method": "bitsandbytes"})
    with pytest.raises(InvalidParameterError, match="quantization_config.lm_head"):
        QuantConfig.from_dict({"quant_method": "tritium", "method": "int8_wo", "lm_head": "yes"})


def test_refuses_to_overwrite(tiny, tmp_path):
    quantize_checkpoint(tiny, tmp_path / "q", "int8_wo", progress=False)
    with pytest.raises(FileExistsError):
        quantize_checkpoint(tiny, tmp_path / "q", "int8_wo", progress=False)


# ---- KV cache in 8 bits -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tol", [("int8", 0.01), ("fp8", 0.1)])  # e4m3: 3 mantissa bits, no scale
def test_model_logits_with_quantized_kv_cache(tiny, kind, tol):
    from backend.kernels.kv_quant import allocate_kv_cache, quantized_kv_ops

    model, cfg = load_model(tiny, quantized_kv_ops(REFERENCE_OPS, kind), torch.float32, "cpu")
    ids = tokens(n=40)
    caches = [allocate_kv_cache(kind, 6, 16, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    got = window_logits(model, ids, caches)
    want = window_logits(load_model(tiny, REFERENCE_OPS, torch.float32, "cpu")[0], ids)
    assert float((got - want).norm() / want.norm()) < tol


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_engine_with_quantized_kv_cache(tiny, kind):
    from backend.engine.config import EngineConfig
    from backend.engine.engine import LLMEngine
    from backend.engine.model_config import ModelConfig
    from backend.engine.model_runner import kv_block_bytes
    from backend.engine.sampling_params import SamplingParams

    cfg = ModelConfig.from_dir(tiny)
    # 16-bit cache vs 8-bit: twice the tokens in the same bytes (int8 less its 2-byte scale per head vector).
    ratio = kv_block_bytes(cfg, 16, torch.bfloat16) / kv_block_bytes(cfg, 16, torch.bfloat16, kind)
    assert ratio == pytest.approx(2.0 if kind == "fp8" else 2 * 16 / 18)
    settings = dict(model=str(tiny), device="cpu", dtype="float32", kv_cache_memory_mb=1)
    engine = LLMEngine(EngineConfig(**settings, kv_cache_dtype=kind))
    base = LLMEngine(EngineConfig(**settings))
    assert engine.runner.num_blocks == pytest.approx(base.runner.num_blocks * (4 if kind == "fp8" else 64 / 18), rel=0.01)
    assert engine.runner.kv_caches[0].dtype != torch.float32
    # what the runner allocates is what kv_block_bytes counted (num_blocks + the scratch block, all layers)
    allocated = sum(c.untyped_storage().nbytes() for c in engine.runner.kv_caches)
    assert allocated == (engine.runner.num_blocks + 1) * kv_block_bytes(cfg, 16, torch.float32, kind)
    prompt = tokens(n=20)[0].tolist()
    params = SamplingParams(max_tokens=6, min_tokens=6)
    out, want = engine.generate([prompt], params)[0], base.generate([prompt], params)[0]
    assert len(out) == 6 and out[0] == want[0]


def test_int4_groups_follow_a_quantized_gguf_source(smollm2_dir, tiny, tmp_path):
    # The bundled SmolLM2 is Q4_1 (blocks of 32): its conversion says so, and INT4 groups default to 32 there;
    # a float checkpoint gets the usual 128, and an explicit group size wins.
    from backend.engine.checkpoint import SOURCE_QUANT_FILE
    from backend.engine.quantization.api import default_group_size

    record = json.loads((smollm2_dir / SOURCE_QUANT_FILE).read_text())
    assert record["projection_types"] == ["Q4_1"] and record["block_size"] == 32
    assert default_group_size(smollm2_dir) == 32
    assert default_group_size(tiny) == 128
    out = quantize_checkpoint(tiny, tmp_path / "g64", "int4_wo", group_size=64, progress=False)
    assert QuantConfig.from_dir(out).group_size == 64
