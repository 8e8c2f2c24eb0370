"""Quantized weights (INT8/INT4 weight-only, AWQ, GPTQ, FP8 and SmoothQuant W8A8) and their loading.

    quantize_checkpoint(src_dir, dst_dir, "int4_awq")      # offline: a new safetensors checkpoint
    load_model(dst_dir, ops)                                # the loader swaps in the quantized layers

See config.py for the methods and formats, writer.py for the tensor layout on disk.
"""
from .api import prepare_quantized_load, quantize_checkpoint, quantize_model_
from .config import CALIBRATED, METHODS, QuantConfig

__all__ = ["CALIBRATED", "METHODS", "QuantConfig", "prepare_quantized_load", "quantize_checkpoint", "quantize_model_"]
