"""The engine's settings: the single source of defaults. The generator writes them, the backend reads them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from .errors import InvalidParameterError

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
LOAD_FORMATS = ("safetensors", "dummy")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")


@dataclass
class EngineConfig:
    """Everything the engine needs besides the checkpoint's own config.json.

    kv_cache_memory_mb sizes the paged KV cache: the number of blocks is that budget over the bytes of one
    block across all layers. None means a default: 512 MiB on CPU, 90% of free GPU memory after weights.
    """

    model: str = ""
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_cache_memory_mb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_waiting_requests: int = 4096
    use_cuda_graphs: bool = True
    # Schedule and prepare step N+1 while the GPU runs step N (engine.py); False: the synchronous reference.
    async_scheduling: bool = True
    attention_backend: str = "auto"
    load_format: str = "safetensors"  # "dummy": random weights of the checkpoint's shapes, for benchmarks
    kv_cache_dtype: str = "auto"  # "auto": the model dtype; "int8" / "fp8": 8-bit cache, ~2x the tokens
    # Batch-1 decode projections on the Triton GEMV kernel instead of cuBLAS (backend/kernels/gemv.py).
    decode_gemv: bool = True
    seed: int = 0
    # Tensor parallelism: ranks (processes, one GPU each) that split every layer; parallel/ has the details.
    tensor_parallel_size: int = 1
    # GPUs of the ranks, comma-separated ("2,3": rank 0 on cuda:2); "" = GPUs 0..tp-1. Triton's KIND_GPU
    # instances get theirs from backend/model.py. Ignored on CPU.
    device_ids: str = ""
    # Small tensor-parallel all-reduces (decode) through PyTorch symmetric memory when every rank can use it,
    # else NCCL (parallel/custom_all_reduce.py); False: always NCCL.
    custom_all_reduce: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _positive_int("block_size", self.block_size)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("max_waiting_requests", self.max_waiting_requests)
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.kv_cache_memory_mb is not None and not (self.kv_cache_memory_mb > 0):
            raise InvalidParameterError("kv_cache_memory_mb", f"must be > 0, got {self.kv_cache_memory_mb}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise InvalidParameterError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("async_scheduling", "decode_gemv", "custom_all_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(name, f"must be true or false, got {getattr(self, name)!r}")
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        parse_device_ids(self.device_ids, self.tensor_parallel_size)
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("load_format", self.load_format, LOAD_FORMATS)
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if not self.enable_chunked_prefill and self.max_model_len and self.max_num_batched_tokens < self.max_model_len:
            raise InvalidParameterError(
                "max_num_batched_tokens",
                f"without chunked prefill it must be >= max_model_len ({self.max_model_len}), got {self.max_num_batched_tokens}",
            )

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        """Build from a plain dict (e.g. the generator's JSON); an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidParameterError(unknown[0], f"unknown engine setting; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_device_ids(text: str, tensor_parallel_size: int) -> list[int]:
    """"2,3" -> [2, 3]; one distinct GPU id per tensor-parallel rank ("" means [] = the default GPUs)."""
    if not isinstance(text, str):
        raise InvalidParameterError("device_ids", f"must be a string like '0,1', got {text!r}")
    if not text.strip():
        return []
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidParameterError("device_ids", f"must be comma-separated GPU ids, got {text!r}") from None
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise InvalidParameterError("device_ids", f"must be distinct non-negative GPU ids, got {text!r}")
    if len(ids) != tensor_parallel_size:
        raise InvalidParameterError(
            "device_ids", f"lists {len(ids)} GPUs for tensor_parallel_size {tensor_parallel_size}: one per rank")
    return ids


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidParameterError(name, f"must be a positive integer, got {value!r}")


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise InvalidParameterError(name, f"must be one of {', '.join(choices)}, got {value!r}")
