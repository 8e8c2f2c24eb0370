"""What a quantized checkpoint declares: `quantization_config` in config.json (ours, AutoAWQ's or AutoGPTQ's;
AutoGPTQ may instead write quantize_config.json), read into one QuantConfig.

Our own config, written by quantize_checkpoint:
    "quantization_config": {"quant_method": "tritium", "method": "int4_awq", "format": "w4a16", "bits": 4,
                            "group_size": 128, "zero_point": true, ...}
`method` is how the weights were made; `format` is what the loader builds (the layer kind and tensor layout):
    w8a16  int8 weights per output channel, activations in the model dtype   (int8_wo)
    w4a16  uint8-packed int4 weights, group-wise scales and zero points        (int4_wo, int4_awq, int4_gptq)
    fp8    e4m3 weights per output channel, e4m3 activations per token         (fp8)
    w8a8   int8 weights per output channel, int8 activations per token         (int8_sq)
`lm_head` (default false): the LM head is quantized too, in `head_format` -- the model's own 8-bit format, or
INT8 weight-only under a 4-bit method (the head is the most sensitive projection; llama.cpp's 4-bit mixes
keep their output matrix at 6 bits for the same reason). It stays in the model dtype by default, as in
AutoAWQ, AutoGPTQ and TensorRT-LLM, whose quantizers quantize it only when asked.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backend.engine.errors import InvalidParameterError

# method -> (format, bits). Names follow TensorRT-LLM's --qformat where one exists.
METHODS = {
    "int8_wo": ("w8a16", 8),
    "int4_wo": ("w4a16", 4),
    "int4_awq": ("w4a16", 4),
    "int4_gptq": ("w4a16", 4),
    "fp8": ("fp8", 8),
    "int8_sq": ("w8a8", 8),
}
CALIBRATED = ("int4_awq", "int4_gptq", "int8_sq", "fp8")  # fp8: GPTQ-rounded weights (see gptq.py)
FORMATS = ("w8a16", "w4a16", "fp8", "w8a8")
# Foreign checkpoints: AutoAWQ (GEMM kernels' layout) and AutoGPTQ, converted to w4a16 at load.
FOREIGN = ("awq", "gptq")


@dataclass
class QuantConfig:
    method: str
    format: str
    bits: int
    group_size: int = 128  # w4a16 only; -1 means one group per row (AutoGPTQ's per-channel)
    zero_point: bool = True
    source: str = "tritium"  # "tritium" | "awq" | "gptq": the tensor layout in the files
    desc_act: bool = False  # AutoGPTQ act-order: a g_idx per input column
    lm_head: bool = False  # the LM head quantized too (in head_format)
    extra: dict = field(default_factory=dict)  # method parameters kept for the record (alpha, calibration)

    @classmethod
    def for_method(cls, method: str, group_size: int = 128, lm_head: bool = False, **extra) -> "QuantConfig":
        if method not in METHODS:
            raise InvalidParameterError("quant", f"unknown method {method!r}; known: {', '.join(METHODS)}")
        fmt, bits = METHODS[method]
        if fmt == "w4a16" and (group_size < 32 or group_size & (group_size - 1)):
            raise InvalidParameterError("group_size", f"must be a power of two >= 32, got {group_size}")
        return cls(method, fmt, bits, group_size if fmt == "w4a16" else -1, fmt == "w4a16", lm_head=lm_head,
                   extra=dict(extra))

    @property
    def head_format(self) -> str:
        """The LM head's format when lm_head is set: 8-bit formats as the projections, w8a16 under w4a16."""
        return "w8a16" if self.format == "w4a16" else self.format

    @property
    def rotated(self) -> bool:
        """The weights are those of the model with its residual stream rotated (rotation.py): the float model is
        the same, and its LM head is never tied to the embedding."""
        return "rotation" in self.extra

    def describe(self) -> str:
        """One line for the tools' output: the method, its format, the INT4 group, where the LM head is, the
        rotation."""
        group = f", groups of {self.group_size}" if self.format == "w4a16" else ""
        head = f", LM head {self.head_format}" if self.lm_head else ""
        rotation = f", {self.extra['rotation']['kind'].replace('_', ' ')} rotation" if self.rotated else ""
        return f"{self.method} ({self.format}{group}{head}{rotation})"

    def to_json(self) -> dict:
        out = {"quant_method": "tritium", **{k: v for k, v in asdict(self).items() if k not in ("source", "extra")}}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "QuantConfig":
        kind = str(raw.get("quant_method", "")).lower()
        if kind == "tritium":
            return _ours(raw)
        if kind == "awq":
            return _autoawq(raw)
        if kind == "gptq" or ("bits" in raw and "desc_act" in raw):
            return _autogptq(raw)
        raise InvalidParameterError("quantization_config", f"quant_method {raw.get('quant_method')!r} is not "
                                    f"supported; supported: tritium, {', '.join(FOREIGN)}")

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> "QuantConfig | None":
        """The checkpoint's quantization, or None for an unquantized one."""
        d = Path(checkpoint_dir)
        config = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        raw = config.get("quantization_config")
        if raw is None and (d / "quantize_config.json").is_file():  # AutoGPTQ before transformers' layout
            raw = {"quant_method": "gptq", **json.loads((d / "quantize_config.json").read_text())}
        return None if raw is None else cls.from_dict(raw)


def _ours(raw: dict) -> "QuantConfig":
    method = raw.get("method")
    if method not in METHODS:
        raise InvalidParameterError("quantization_config.method", f"unknown {method!r}; known: {', '.join(METHODS)}")
    fmt, bits = METHODS[method]
    known = {"quant_method", "method", "format", "bits", "group_size", "zero_point", "desc_act", "lm_head"}
    lm_head = raw.get("lm_head", False)
    if not isinstance(lm_head, bool):
        raise InvalidParameterError("quantization_config.lm_head", f"must be true or false, got {lm_head!r}")
    return QuantConfig(method, fmt, bits, int(raw.get("group_size", -1)), bool(raw.get("zero_point", False)),
                       lm_head=lm_head, extra={k: v for k, v in raw.items() if k not in known})


def _autoawq(raw: dict) -> "QuantConfig":
    bits = int(raw.get("bits", raw.get("w_bit", 4)))
    version = str(raw.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise InvalidParameterError("quantization_config", f"AutoAWQ checkpoints load only as 4-bit GEMM layout; "
                                    f"got bits={bits}, version={version!r}")
    group = int(raw.get("group_size", raw.get("q_group_size", 128)))
    return QuantConfig("int4_awq", "w4a16", 4, group, bool(raw.get("zero_point", True)), source="awq")


def _autogptq(raw: dict) -> "QuantConfig":
    bits = int(raw.get("bits", 4))
    if bits != 4:
        raise InvalidParameterError("quantization_config.bits", f"only 4-bit GPTQ checkpoints load, got {bits}")
    if raw.get("checkpoint_format", "gptq") not in ("gptq", None):
        raise InvalidParameterError("quantization_config.checkpoint_format",
                                    f"{raw['checkpoint_format']!r} is not supported (only 'gptq')")
    return QuantConfig("int4_gptq", "w4a16", 4, int(raw.get("group_size", 128)), True, source="gptq",
                       desc_act=bool(raw.get("desc_act", False)), extra={"sym": bool(raw.get("sym", True))})
