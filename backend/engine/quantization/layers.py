"""Quantized replacements for the model's nn.Linear projections, and the swap itself.

Each layer keeps its quantized tensors as (frozen) nn.Parameters named like the checkpoint's tensors, so the
model's own load_weights splices q/k/v and gate/up shards into them exactly as it does for float weights
(every tensor here is split along its first dimension, the output channels). On CUDA with the Triton ops the
forward runs our kernels; elsewhere the dequantize-then-matmul references.
"""
from __future__ import annotations

import torch
from torch import nn

from backend.kernels import gemv
from backend.kernels import quant_matmul as qm
from backend.kernels import scaled_matmul as sm

from . import rtn
from .config import QuantConfig

# The projections a quantization replaces (names in our model); embeddings and norms stay, and the LM head
# too unless the config's lm_head says otherwise.
QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


# INT4 group scales are held as the checkpoint stores them (float16, as AutoAWQ and AutoGPTQ do too): the kernels
# widen them to float32 as they load them, so float32 here only added 2 bytes a group to every step's weight
# stream (110 MB of an 8B model's ~4.3 GB at batch 1) and no precision.
INT4_SCALE_DTYPE = torch.float16


def _frozen(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class QuantLinear(nn.Module):
    """Common part: shape, optional float bias, and which implementation runs."""

    def __init__(self, in_features: int, out_features: int, bias: bool, use_triton: bool, dtype, device):
        super().__init__()
        self.in_features, self.out_features, self.use_triton = in_features, out_features, use_triton
        self.act_dtype = dtype  # the model's dtype: what this layer takes and returns
        self.bias = _frozen((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out if self.bias is None else out + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def silu_and_mul_decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """SiLU-and-mul of this [gate; up] projection in the batch-1 GEMV's epilogue (one kernel less per layer,
        as gemv.GemvLinear); None where no gated GEMV applies (CPU, several rows, a bias)."""
        return gemv.silu_and_mul_row(x, self.bias, self.gated_gemv) if self.use_triton else None

    def gated_gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, triton={self.use_triton}"


class Int8WeightOnlyLinear(QuantLinear):
    def __init__(self, in_features, out_features, bias=False, use_triton=False, dtype=torch.float32, device="cpu"):
        super().__init__(in_features, out_features, bias, use_triton, dtype, device)
        self.qweight = _frozen((out_features, in_features), torch.int8, device)
        self.scales = _frozen((out_features,), torch.float32, device)

    def matmul(self, x):
        fn = qm.w8a16_matmul_triton if self.use_triton else qm.w8a16_matmul_ref
        return fn(x, self.qweight, self.scales)

    def gated_gemv(self, x):
        if self.in_features % 4 or not self.qweight.is_contiguous():
            return None
        return qm.w8a16_gemv_triton(x, self.qweight, self.scales, gated=True)

    def set_float_weight(self, weight: torch.Tensor) -> None:
        q, s = rtn.quantize_int8(weight)
        self.qweight.data.copy_(q)
        self.scales.data.copy_(s)


class Int4WeightOnlyLinear(QuantLinear):
    def __init__(self, in_features, out_features, bias=False, use_triton=False, dtype=torch.float32, device="cpu",
                 group_size: int = 128):
        super().__init__(in_features, out_features, bias, use_triton, dtype, device)
        self.group_size = in_features if group_size == -1 else group_size
        qm.check_group_size(in_features, self.group_size)
        groups = -(-in_features // self.group_size)
        self.qweight = _frozen((out_features, in_features // 2), torch.uint8, device)
        self.scales = _frozen((out_features, groups), INT4_SCALE_DTYPE, device)
        self.qzeros = _frozen((out_features, groups), torch.uint8, device)

    def matmul(self, x):
        if not self.use_triton:
            return qm.w4a16_matmul_ref(x, self.qweight, self.scales, self.qzeros, self.group_size)
        return qm.w4a16_matmul_triton(x, self.planar_words(), self.scales, self.qzeros, self.group_size)

    def gated_gemv(self, x):
        return qm.w4a16_gemv_triton(x, self.planar_words(), self.scales, self.qzeros, self.group_size, gated=True)

    def planar_words(self) -> torch.Tensor:
        """qweight in the kernels' layout (qm.to_planar_int4). The packed pairs that load_weights fills are
        repacked in place at the first Triton forward (warmup runs one before any CUDA-graph capture), so the
        weight is held once; qweight's dtype tells the two apart (uint8 pairs, int32 planar words)."""
        if self.qweight.dtype == torch.uint8:
            if qm._capturing(self.qweight.device):
                raise RuntimeError("Int4WeightOnlyLinear: run one forward (quantization.layers.warmup) before "
                                   "capturing a CUDA graph; the weights are repacked on the first one")
            self.qweight.data = qm.to_planar_int4(self.qweight.data, self.group_size)
        return self.qweight

    def set_float_weight(self, weight: torch.Tensor) -> None:
        q, s, z = rtn.quantize_int4(weight, self.group_size)
        self.qweight.data = qm.pack_int4(q).to(self.scales.device)
        self.scales.data.copy_(s)
        self.qzeros.data.copy_(z)


class W8A8Linear(QuantLinear):
    """INT8 (SmoothQuant) or FP8: weights per output channel, activations quantized per token at run time."""

    silu_and_mul_decode = None  # its input may come quantized from the norm before it: no gated GEMV

    def __init__(self, in_features, out_features, bias=False, use_triton=False, dtype=torch.float32, device="cpu",
                 kind: str = "int8"):
        super().__init__(in_features, out_features, bias, use_triton, dtype, device)
        self.kind = kind
        if kind == "fp8":  # named as vLLM / compressed-tensors FP8 checkpoints name them
            self.weight = _frozen((out_features, in_features), torch.float8_e4m3fn, device)
            self.weight_scale = _frozen((out_features,), torch.float32, device)
        else:
            self.qweight = _frozen((out_features, in_features), torch.int8, device)
            self.scales = _frozen((out_features,), torch.float32, device)

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.weight, self.weight_scale) if self.kind == "fp8" else (self.qweight, self.scales)

    def matmul(self, x):
        wq, ws = self._codes()
        if isinstance(x, tuple):  # rows already quantized by the norm or activation kernel before this layer
            codes, scales = x
            fn = sm.scaled_matmul_triton if self.use_triton else sm.scaled_matmul_ref
            return fn(codes, scales, wq, ws, self.act_dtype)
        fn = sm.w8a8_linear_triton if self.use_triton else sm.w8a8_linear_ref
        return fn(x, wq, ws, self.kind)

    def set_float_weight(self, weight: torch.Tensor) -> None:
        q, s = rtn.quantize_fp8(weight) if self.kind == "fp8" else rtn.quantize_int8(weight)
        wq, ws = self._codes()
        wq.data.copy_(q)
        ws.data.copy_(s)


def make_linear(qcfg: QuantConfig, in_features: int, out_features: int, bias: bool, use_triton: bool,
                dtype: torch.dtype, device, fmt: str | None = None) -> QuantLinear:
    """An empty quantized layer of `fmt` (default: the config's format)."""
    fmt = fmt or qcfg.format
    args = (in_features, out_features, bias, use_triton, dtype, device)
    if fmt == "w8a16":
        return Int8WeightOnlyLinear(*args)
    if fmt == "w4a16":
        return Int4WeightOnlyLinear(*args, group_size=qcfg.group_size)
    return W8A8Linear(*args, kind="fp8" if fmt == "fp8" else "int8")


def quantized_linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS]


def replace_linears(model: nn.Module, qcfg: QuantConfig, use_triton: bool, quantize: bool = False) -> None:
    """Swaps every projection for an empty quantized layer (to be filled by load_weights), or, with
    quantize=True, for one quantized by round-to-nearest from the current float weights (dummy weights,
    tests)."""
    for name in quantized_linear_names(model):
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        bias = old.bias is not None
        new = make_linear(qcfg, old.in_features, old.out_features, bias, use_triton,
                          old.weight.dtype, old.weight.device)
        if quantize:
            new.set_float_weight(old.weight.data)
            if bias:
                new.bias.data.copy_(old.bias.data)
        setattr(parent, attr, new)
    if qcfg.lm_head:
        replace_lm_head(model, qcfg, use_triton, quantize)
    fuse_activation_quantization(model)


def replace_lm_head(model: nn.Module, qcfg: QuantConfig, use_triton: bool, quantize: bool = False) -> None:
    """model.lm_head becomes a quantized layer in qcfg.head_format (also for tied embeddings: the embedding
    stays the float input table, the head gets its own quantized copy); compute_logits then calls it."""
    embedding = model.model.embed_tokens.weight
    float_head = embedding if model.lm_head is None else model.lm_head.weight
    vocab, hidden = float_head.shape
    head = make_linear(qcfg, hidden, vocab, False, use_triton, embedding.dtype, embedding.device,
                       fmt=qcfg.head_format)
    if quantize:
        head.set_float_weight(float_head.data)
    model.lm_head = head


def fuse_activation_quantization(model: nn.Module) -> int:
    """Where a W8A8 projection on the Triton path reads a norm's output (qkv and gate_up), the norm kernel emits
    the per-token quantized rows itself: one launch and one pass over the activations fewer per projection.
    (down reads SiLU-and-mul's output: a fused version with one program per row was 3x slower than the two
    kernels at batch 64 on an H100, too few programs for a 14336-wide row; o reads attention's.) Returns how
    many norms it switched. Quantizing inside the preceding norm is TensorRT-LLM's fused RMSNorm + quantize."""
    count = 0
    for layer in getattr(getattr(model, "model", None), "layers", []):
        for norm, consumer in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                               (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
            if isinstance(consumer, W8A8Linear) and consumer.use_triton and norm.ops.rms_norm_quant is not None:
                norm.output_kind = consumer.kind
                count += 1
    return count


def warmup(model: nn.Module, max_rows: int = 256) -> None:
    """Runs each distinct quantized layer shape once per launch plan (one row, M <= 16, <= 64, below
    qm.DEQUANT_MIN_M, larger), so no Triton kernel compiles on live traffic. The max_rows run also allocates the
    dequantize scratch (qm._DequantScratch: W4A16 from DEQUANT_MIN_M rows, narrow W8A16 products from MEDIUM_M)
    at its full size before any CUDA graph is captured: inside a capture it cannot be allocated, and those decode
    buckets would fall back to the slower tiled kernels."""
    seen = set()
    for module in model.modules():
        if not isinstance(module, QuantLinear) or not module.use_triton:
            continue
        if isinstance(module, Int4WeightOnlyLinear):
            module.planar_words()  # every layer, not only the first of each shape
        key = (type(module), module.in_features, module.out_features, getattr(module, "group_size", 0))
        if key in seen:
            continue
        seen.add(key)
        device = next(module.parameters()).device
        for rows in (1, qm.SMALL_M, qm.MEDIUM_M, qm.DEQUANT_MIN_M - 1, max(max_rows, qm.DEQUANT_MIN_M)):
            module(torch.zeros(rows, module.in_features, dtype=module.act_dtype, device=device))
        if isinstance(module, Int8WeightOnlyLinear):  # its dequantize kernel (prefill chunks of W8_DEQUANT_MIN_M+)
            qm.dequantize_int8_triton(module.qweight[:16], module.scales[:16], module.act_dtype)
