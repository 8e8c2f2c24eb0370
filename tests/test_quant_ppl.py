"""Perplexity of the bundled SmolLM2-135M, quantized each way, against the unquantized model in the same run, on
held-out text of the Lee corpus (documents 200-299; calibration uses documents 0-199).

Targets from the issue: INT8 weight-only and FP8 within +1%, SmoothQuant within +3%, INT4 AWQ and GPTQ within
+6% and better than INT4 round-to-nearest. Each target is asserted as stated; the ones this model does not
reach are strict xfails (they turn into failures the day they pass), next to a test of the figure reached.
Measured figures and where the remaining error is: perf/RESULTS.md, "Quantization accuracy on SmolLM2-135M".
SmolLM2-135M is a hard case for 4 bits: its weights are themselves dequantized from Q4_1 (blocks of 32), so a
group of 128 would have to cover four differently offset 4-bit grids; INT4 groups follow the source's blocks
(32) by default, and at 135M parameters every layer matters.
"""
from __future__ import annotations

import pytest
import torch

from backend.engine.quantization import quantize_checkpoint
from backend.engine.quantization.calibration import CORPUS_INSTALL, corpus_path, eval_texts, token_windows
from backend.engine.quantization.perplexity import checkpoint_perplexity

EVAL_WINDOWS = 4  # x 512 tokens: ~5 s per model on 2 cores
# Calibration windows of 512 tokens (the library's default is 32). GPTQ, FP8 (GPTQ-rounded) and AWQ get 16:
# with 8 the Hessian of down_proj (K = 1536) overfits (held-out output error no better than round-to-nearest's)
# and AWQ's scales carry over less well (measured +18.5% with 8, +15.6% with 16, before AWQ's weights were rounded
# by GPTQ). 32 windows did not help GPTQ (+14.5% vs +14.0% on 20 held-out windows, at 2.5% damping).
CALIB_SAMPLES = {"int4_gptq": 16, "fp8": 16, "int4_awq": 16}
DEFAULT_CALIB_SAMPLES = 8

pytestmark = pytest.mark.slow


def _corpus_missing() -> bool:
    try:
        corpus_path()
        return False
    except FileNotFoundError:
        return True


if _corpus_missing():  # the environment's setup installs it; say how if it did not
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=f"calibration corpus not installed: {CORPUS_INSTALL}")]


@pytest.fixture(scope="module")
def eval_windows(smollm2_dir):
    from backend.engine.checkpoint import load_tokenizer

    return token_windows(load_tokenizer(smollm2_dir), eval_texts(), 512, EVAL_WINDOWS)


@pytest.fixture(scope="module")
def ppl(smollm2_dir, eval_windows, tmp_path_factory):
    """Perplexity of a method (None: unquantized), each computed once per session."""
    root = tmp_path_factory.mktemp("ppl")
    cache = {}
    get_checkpoint = {}

    def get(method):
        if method not in cache:
            base_method, _, head = (method or "").partition("+")  # "+head": --quant-lm-head
            path = smollm2_dir if method is None else quantize_checkpoint(
                smollm2_dir, root / method, base_method, quantize_lm_head=head == "head",
                calib_samples=CALIB_SAMPLES.get(method, DEFAULT_CALIB_SAMPLES), progress=False)
            cache[method] = checkpoint_perplexity(path, eval_windows)
            get_checkpoint[method] = path
        return cache[method]

    get.checkpoint = get_checkpoint.__getitem__  # the folder a method's figure came from
    yield get
    if None in cache:  # the figures of perf/RESULTS.md (shown with pytest -s)
        print("\nperplexity change vs unquantized (%.2f): " % cache[None] + ", ".join(
            f"{m} {100 * (p / cache[None] - 1):+.1f}%" for m, p in cache.items() if m is not None))


def test_int8_weight_only_within_1_percent(ppl):
    assert ppl("int8_wo") / ppl(None) < 1.01


def test_int8_weight_only_with_quantized_lm_head_within_1_percent(ppl):
    # --quant-lm-head: the (tied) head in INT8 weight-only too; it must still meet INT8's target, and it costs
    # something over the float head (so the head really is quantized).
    assert ppl("int8_wo") < ppl("int8_wo+head") < 1.01 * ppl(None)


@pytest.mark.xfail(strict=True, reason="measured +1.2%: the dynamic per-token e4m3 activations alone cost +1.1%")
def test_fp8_w8a8_within_1_percent(ppl):
    assert ppl("fp8") / ppl(None) < 1.01


def test_fp8_w8a8_reached(ppl):
    # What holds (measured +1.2%): within +2%, and worse than INT8 weight-only (the order the formats imply).
    assert ppl("int8_wo") < ppl("fp8") < 1.02 * ppl(None)


def test_int4_rtn_is_worse_than_8_bit(ppl):
    assert ppl("int4_wo") > ppl("int8_wo")


def test_int4_gptq_beats_rtn(ppl):
    assert ppl("int4_gptq") < ppl("int4_wo")


def test_int4_awq_beats_rtn(ppl):
    assert ppl("int4_awq") < ppl("int4_wo")


# INT4 groups are 32 columns here, the default for a source quantized in blocks of 32 (quantization.api's
# default_group_size): at 128 the same methods measured GPTQ +8.6% (+15.7% unrotated) and AWQ +8.7% (RTN +28.5%).
def test_int4_gptq_within_6_percent(ppl):
    # Measured +5.2% (+5.7% on 20 held-out windows; +4.8% and +5.9% with rotation seeds 2 and 1), GPTQ on the
    # model with its residual stream rotated. Unrotated it measured +7.2% (+8.8%).
    assert ppl("int4_gptq") / ppl(None) < 1.06


def test_int4_gptq_checkpoint_is_the_rotated_model(ppl, smollm2_dir):
    """The rotation is recorded, the norms are folded (ones), and the head is stored apart from the embedding."""
    import json

    from backend.engine.checkpoint import iter_safetensors

    ppl("int4_gptq")
    config = json.loads((ppl.checkpoint("int4_gptq") / "config.json").read_text())
    assert config["quantization_config"]["rotation"] == {"kind": "randomized_hadamard", "seed": 0}
    assert config["tie_word_embeddings"] is False
    assert json.loads((smollm2_dir / "config.json").read_text())["tie_word_embeddings"] is True
    tensors = dict(iter_safetensors(ppl.checkpoint("int4_gptq")))
    assert torch.equal(tensors["model.layers.3.input_layernorm.weight"], torch.ones(576))
    head, embedding = tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
    assert head.shape == embedding.shape and not torch.allclose(head, embedding, atol=1e-3)


def test_int4_awq_within_6_percent(ppl):
    # Measured +4.1% (+4.9% on 20 held-out windows; +3.8% and +4.8% in session 11); with groups of 128, +8.7%.
    assert ppl("int4_awq") / ppl(None) < 1.06


def test_smoothquant_within_3_percent(ppl):
    assert ppl("int8_sq") / ppl(None) < 1.03
