"""The two entry points: `quantize_checkpoint` (the offline pass the repo generator calls) and
`prepare_quantized_load` (what load_model calls when a checkpoint declares a quantization)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch

from backend.engine.errors import InvalidParameterError

from .config import CALIBRATED, QuantConfig
from .layers import replace_linears
from .rotation import rotation_kind
from .writer import rtn_tensors, with_quantized_head, write_configs, write_shards

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DEFAULT_GROUP_SIZE = 128
# The calibrated methods' defaults (quantize_checkpoint's and the tools'): windows of calibration text, tokens
# per window, and SmoothQuant's migration strength alpha (the paper's 0.5).
DEFAULT_CALIB_SAMPLES = 32
DEFAULT_CALIB_SEQ_LEN = 512
DEFAULT_SMOOTHQUANT_ALPHA = 0.5
# Methods that quantize a model with its residual stream rotated (rotation.py), and the rotation's seed. GPTQ on
# the bundled SmolLM2 (groups of 32, 20 held-out windows, perf/RESULTS.md): +8.8% unrotated, +5.7% rotated
# (+5.9% and +4.8% with seeds 1 and 2). AWQ's channel scales are its own answer to the same problem.
ROTATED = ("int4_gptq",)
ROTATION_SEED = 0


def default_group_size(src_dir: str | Path) -> int:
    """128 (AutoAWQ's, AutoGPTQ's and TensorRT-LLM's default), or the source's block when the source was itself
    quantized in smaller blocks (a Q4_1 GGUF: 32). A group of 128 over four Q4_1 blocks must cover four grids
    of different offsets with one integer zero point; on the bundled SmolLM2 (perplexity on 20 held-out windows,
    perf/RESULTS.md) round-to-nearest costs +28.7% at 128 and +24.4% at 32, AWQ +8.9% and +4.8%."""
    from backend.engine.checkpoint import source_block_size

    block = source_block_size(src_dir)
    return DEFAULT_GROUP_SIZE if block is None else min(DEFAULT_GROUP_SIZE, max(32, block))


def quantize_checkpoint(src_dir: str | Path, dst_dir: str | Path, method: str, *, group_size: int | None = None,
                        dtype: str = "auto", calib_texts: list[str] | None = None,
                        calib_samples: int = DEFAULT_CALIB_SAMPLES, calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
                        smoothquant_alpha: float = DEFAULT_SMOOTHQUANT_ALPHA, device: str = "cpu",
                        quantize_lm_head: bool = False, progress: bool = True, overwrite: bool = False) -> Path:
    """Writes a quantized copy of the HF-style checkpoint `src_dir` to `dst_dir`; returns dst_dir.

    method: int8_wo | int4_wo (round-to-nearest, streamed tensor by tensor, no model needed) or
    int4_awq | int4_gptq | int8_sq | fp8 (calibrated: the model runs `calib_samples` windows of `calib_seq_len`
    tokens of `calib_texts`, by default the bundled corpus's calibration split, on `device`; fp8's e4m3 weights
    are rounded by GPTQ, its activations stay dynamic per token).
    dtype: of the tensors left unquantized (embeddings, norms, LM head); "auto" keeps the source's.
    group_size: INT4 group; None: default_group_size(src_dir).
    quantize_lm_head: the LM head too, by round-to-nearest in QuantConfig.head_format (off by default, as in
    AutoAWQ/AutoGPTQ/TensorRT-LLM: at batch 1 it is ~7% of an 8B model's bytes, so it matters to speed).
    """
    src, dst = Path(src_dir), Path(dst_dir)
    check_calibration_options(method, calib_samples, calib_seq_len, smoothquant_alpha, device)
    group_size = default_group_size(src) if group_size is None else group_size
    extra = {"smoothquant_alpha": smoothquant_alpha} if method == "int8_sq" else {}
    if method in ROTATED:
        extra["rotation"] = {"kind": rotation_kind(_model_config(src).hidden_size), "seed": ROTATION_SEED}
    if method in CALIBRATED:
        extra["calibration"] = {"samples": calib_samples, "seq_len": calib_seq_len,
                                "text": "custom" if calib_texts else "lee_background"}
    qcfg = QuantConfig.for_method(method, group_size, lm_head=quantize_lm_head, **extra)
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if (dst / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{dst} already holds a checkpoint (pass overwrite=True to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        tensors = _tensors(src, qcfg, DTYPES[dtype], calib_texts, calib_samples, calib_seq_len, device, progress)
        if qcfg.lm_head:
            tensors = with_quantized_head(tensors, qcfg, _model_config(src).tie_word_embeddings
                                          and not qcfg.rotated)
        write_shards(tensors, scratch)
        write_configs(src, scratch, qcfg, DTYPES[dtype])
        if dst.exists():
            shutil.rmtree(dst)
        scratch.rename(dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dst


def check_calibration_options(method: str, calib_samples: int = DEFAULT_CALIB_SAMPLES,
                              calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
                              smoothquant_alpha: float = DEFAULT_SMOOTHQUANT_ALPHA, device: str = "cpu") -> None:
    """Before any work: the calibrated methods' options, each named in the error as its parameter."""
    if method not in CALIBRATED:
        return
    for field, value in (("calib_samples", calib_samples), ("calib_seq_len", calib_seq_len)):
        if not isinstance(value, int) or value < 1:
            raise InvalidParameterError(field, f"must be a whole number of at least 1, got {value!r}")
    if method == "int8_sq" and not 0.0 <= smoothquant_alpha <= 1.0:  # SmoothQuant's migration strength
        raise InvalidParameterError("smoothquant_alpha", f"must be between 0 and 1, got {smoothquant_alpha!r}")
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameterError("device", f"expected cpu or cuda (cuda:N), got {device!r}") from None
    if where.type not in ("cpu", "cuda"):
        raise InvalidParameterError("device", f"expected cpu or cuda (cuda:N), got {device!r}")
    if where.type == "cuda" and (not torch.cuda.is_available() or (where.index or 0) >= torch.cuda.device_count()):
        raise InvalidParameterError("device", f"{device} asked for calibration, but this machine has "
                                              f"{torch.cuda.device_count()} CUDA device(s)")


def _model_config(src: Path):
    from backend.engine.model_config import ModelConfig

    return ModelConfig.from_dir(src)


def _tensors(src: Path, qcfg: QuantConfig, dtype, calib_texts, samples, seq_len, device, progress) -> Iterator:
    from backend.engine.checkpoint import iter_safetensors

    if qcfg.method not in CALIBRATED:
        from tqdm.auto import tqdm

        return rtn_tensors(qcfg, tqdm(iter_safetensors(src), desc=f"quantizing ({qcfg.method})", unit="tensor",
                                      disable=not progress), dtype)
    from .calibrated import calibrated_tensors

    return calibrated_tensors(src, qcfg, dtype, calib_texts, samples, seq_len, device, progress)


def prepare_quantized_load(model: torch.nn.Module, qcfg: QuantConfig, ops,
                           weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """Swaps the model's projections for empty quantized layers and returns the checkpoint's tensors in our
    layout (AutoAWQ / AutoGPTQ tensors are repacked on the fly)."""
    replace_linears(model, qcfg, use_triton=ops.name == "triton")
    if qcfg.source == "tritium":
        return weights
    from .foreign import convert_foreign

    return convert_foreign(weights, qcfg)


def quantize_model_(model: torch.nn.Module, method: str, ops, group_size: int = 128,
                    lm_head: bool = False) -> QuantConfig:
    """Round-to-nearest quantization of a loaded float model, in place (benchmarks on dummy weights, tests)."""
    qcfg = QuantConfig.for_method(method, group_size, lm_head=lm_head)
    replace_linears(model, qcfg, use_triton=ops.name == "triton", quantize=True)
    return qcfg
