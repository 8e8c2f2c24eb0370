"""Turns a SchedulerOutput into one forward pass over the paged KV cache and samples the next tokens."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .attention_metadata import AttentionMetadata
from .checkpoint import load_model
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .host_inputs import build_host_inputs
from .model_config import ModelConfig
from .ops import select_ops
from .outputs import SampledTokens, SchedulerOutput
from .parallel.channel import HostStep
from .parallel.sharding import shard_config
from .request import Request
from .sampler import PendingTokens, Sampler

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_MB = 512
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str, device_ids: str = "", rank: int = 0) -> torch.device:
    """The device of tensor-parallel rank `rank`: on CUDA, GPU device_ids[rank] (default: GPU `rank`).

    An explicit index (not CUDA_VISIBLE_DEVICES set in-process) keeps working when something in the process
    initialized CUDA before the engine did, and lets one process see the GPUs of its tensor-parallel peers."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch sees no CUDA device")
    if name != "cuda":
        return torch.device(name)
    ids = [int(i) for i in device_ids.split(",")] if device_ids else None
    index = ids[rank] if ids else rank
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"device_ids: GPU {index} does not exist (torch sees {torch.cuda.device_count()})")
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


@dataclass
class BatchInputs:
    """Flattened inputs of one step, already on the device."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # rows of the hidden states whose logits are sampled


def kv_block_bytes(model_config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes one block takes across all layers: keys and values of block_size tokens."""
    per_head = model_config.head_dim * torch.empty((), dtype=dtype).element_size()
    if kv_cache_dtype != "auto":
        from backend.kernels.kv_quant import bytes_per_head

        per_head = bytes_per_head(kv_cache_dtype, model_config.head_dim)
    return 2 * model_config.num_layers * model_config.num_kv_heads * per_head * block_size


class ModelRunner:
    """`parallel` (a ParallelGroup) makes this one tensor-parallel rank: it loads its shard of the weights
    and runs forwards in lockstep with the other ranks; rank 0 is parallel/runner.py's DriverRunner."""

    def __init__(self, config: EngineConfig, checkpoint_dir: Path, device: torch.device | None = None,
                 parallel=None):
        self.config = config
        self.parallel = parallel
        self.device = device or resolve_device(config.device, config.device_ids, parallel.rank if parallel else 0)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Triton kernels and graph capture use the current device
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.ops = select_ops(config.attention_backend, self.device.type)
        if config.kv_cache_dtype != "auto":
            from backend.kernels.kv_quant import quantized_kv_ops

            self.ops = quantized_kv_ops(self.ops, config.kv_cache_dtype)
        self.model, self.model_config = self._load(checkpoint_dir)
        # What this rank holds: the model's heads and MLP columns over the tensor-parallel ranks.
        self.shard_config = shard_config(self.model_config, parallel.world_size if parallel else 1)
        if config.decode_gemv and self.ops.name == "triton" and self.dtype in (torch.float16, torch.bfloat16):
            from backend.kernels.gemv import use_gemv_for_decode

            use_gemv_for_decode(self.model)
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()  # handed to the block manager; one more block is scratch
        self.kv_caches = self._allocate_kv_cache()
        self.sampler = Sampler()
        # Async scheduling: the last launched step's sampled ids, still on the device, and each sampling
        # request's row in them; the next step's placeholder rows read their input token from there.
        self._last_sampled: torch.Tensor | None = None
        self._last_sample_index: dict[Request, int] = {}
        self.graphs: DecodeGraphs | None = None
        self.warmup_seconds = 0.0

    def shutdown(self) -> None:
        """Nothing to stop in one process; the tensor-parallel driver stops its workers here."""

    def release_graphs(self) -> None:
        """Destroys the captured decode graphs (their memory pool goes back to the allocator); later decode steps
        run eagerly. Tensor-parallel ranks do this before leaving their process group: NCCL releases what a
        collective captured in a graph holds only when the graph is destroyed, and the communicator's shutdown
        waits for that (on 2x H200, with the graphs alive, it waited until the process was killed)."""
        if self.graphs is not None:
            torch.cuda.synchronize(self.device)
            self.graphs = None

    def _load(self, checkpoint_dir: Path):
        if self.parallel is not None:
            from .parallel.sharding import load_shard

            return load_shard(checkpoint_dir, self.config, self.ops, self.dtype, self.device, self.parallel)
        if self.config.load_format == "safetensors":
            return load_model(checkpoint_dir, self.ops, self.dtype, self.device)
        from .models.registry import build_model

        model_config = ModelConfig.from_dir(checkpoint_dir)
        model = build_model(model_config, self.ops, self.dtype, self.device)
        fill_random_weights(model, self.config.seed)
        self._quantize_dummy(model, checkpoint_dir)
        return model, model_config

    def _quantize_dummy(self, model, checkpoint_dir: Path) -> None:
        """Dummy weights of a quantized checkpoint: the random float weights, quantized in place."""
        from .quantization import QuantConfig, quantize_model_

        quant = QuantConfig.from_dir(checkpoint_dir)
        if quant is not None:
            quantize_model_(model, quant.method, self.ops, max(quant.group_size, 32), lm_head=quant.lm_head)

    def warm_up(self, max_model_len: int) -> None:
        """Compiles every kernel specialization and captures decode graphs, so live traffic never JITs."""
        if self.device.type != "cuda":
            return
        start = time.perf_counter()
        if self.ops.name == "triton":
            self._warm_up_kernels()
            from .quantization.layers import warmup as warm_up_quantized_linears

            warm_up_quantized_linears(self.model)
        self._warm_up_forward(max_model_len)
        if self.config.use_cuda_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.config.max_num_seqs,
                                       -(-max_model_len // self.block_size), self.scratch_slot, self.device)
            self.graphs.capture()
        self.warmup_seconds = time.perf_counter() - start
        log.info("warm-up (kernels and CUDA graphs) took %.1f s", self.warmup_seconds)

    def _warm_up_kernels(self) -> None:
        from backend.kernels.triton_ops import warmup

        mc = self.shard_config
        warmup(hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size, num_q_heads=mc.num_heads,
               num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, kv_cache=self.kv_caches[0], dtype=self.dtype,
               eps=mc.rms_norm_eps, ops=self.ops)
        if self.parallel is None or self.parallel.is_driver:  # only rank 0 samples
            self.sampler.warm_up(self.model_config.vocab_size, self.dtype, self.device)  # full vocab: after the gather

    def _warm_up_forward(self, max_model_len: int) -> None:
        """Eager forwards over the batch shapes traffic brings (a long prefill; a prefill chunk mixed with
        decodes; pure decode), so every kernel variant and cuBLAS handle exists before the first request.
        Every block-table entry is the scratch block, so all writes land there and reads stay in bounds; the
        values are garbage, and nobody reads them."""
        longest = min(2048, self.config.max_num_batched_tokens, max_model_len)
        for query_lens in ([longest], [min(64, longest), 1, 1, 1], [min(5, longest)], [1, 1], [1]):
            self._forward_dummy(query_lens)
        torch.cuda.synchronize(self.device)

    def _forward_dummy(self, query_lens: list[int]) -> None:
        scratch = self.num_blocks
        bs = self.block_size
        token_ids = [0] * sum(query_lens)
        positions = [p for n in query_lens for p in range(n)]
        slots = [scratch * bs + p % bs for p in positions]
        query_start = [0]
        for n in query_lens:
            query_start.append(query_start[-1] + n)
        width = -(-max(query_lens) // bs)
        parts = [token_ids, positions, slots, query_start, query_lens, [scratch] * (width * len(query_lens))]
        ids, pos, slot_mapping, qsl, lens, tables = self._to_device(parts)
        meta = AttentionMetadata(slot_mapping, qsl.to(torch.int32), lens.to(torch.int32),
                                 tables.to(torch.int32).view(-1, width), max(query_lens), max(query_lens),
                                 query_start, list(query_lens))
        with torch.inference_mode():
            self.model.compute_logits(self.model(ids, pos, meta, self.kv_caches))

    @property
    def scratch_slot(self) -> int:
        """First slot of the spare block past the ones the block manager owns: padding rows write there."""
        return self.num_blocks * self.block_size

    def _num_kv_blocks(self) -> int:
        block_bytes = kv_block_bytes(self.shard_config, self.block_size, self.dtype, self.config.kv_cache_dtype)
        budget = self._kv_budget_bytes()
        num_blocks = int(budget // block_bytes)
        if self.parallel is not None:  # rank 0's block manager hands out block ids for every rank's cache
            num_blocks = self.parallel.min_over_ranks(num_blocks)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_mb: {budget / 2**20:.1f} MiB holds no block of {block_bytes} bytes")
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size, num_blocks * block_bytes / 2**20)
        return num_blocks

    def _kv_budget_bytes(self) -> float:
        if self.config.kv_cache_memory_mb is not None:
            return self.config.kv_cache_memory_mb * 2**20
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_MB * 2**20
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = (1.0 - self.config.gpu_memory_utilization) * total
        return max(free - reserve, 0.0)

    def _allocate_kv_cache(self) -> list[torch.Tensor]:
        mc = self.shard_config
        dims = (self.num_blocks + 1, self.block_size, mc.num_kv_heads, mc.head_dim)
        if self.config.kv_cache_dtype != "auto":
            # 8-bit caches: [2, *dims] of codes; int8 keeps its scales beside each block's codes (the layout is
            # kv_quant's: kv_block_bytes' D + 2 bytes per head vector)
            from backend.kernels.kv_quant import allocate_kv_cache

            return [allocate_kv_cache(self.config.kv_cache_dtype, *dims, device=self.device)
                    for _ in range(mc.num_layers)]
        return [torch.zeros((2, *dims), dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> SampledTokens:
        """The synchronous step: forward, sample, and wait for the ids on the host."""
        logits, sampling = self._forward(scheduled)
        self._last_sampled, self._last_sample_index = None, {}
        return self.sampler(logits, [chunk.request for chunk in sampling], [chunk.output_index for chunk in sampling])

    @torch.inference_mode()
    def launch(self, scheduled: SchedulerOutput) -> PendingTokens:
        """Async scheduling: enqueue forward, sampling and the copy of the ids to the host, and return without
        waiting. The ids also stay on the device for the next step's placeholder rows."""
        logits, sampling = self._forward(scheduled)
        tokens, logprobs = self.sampler.sample(logits, [chunk.request for chunk in sampling],
                                               [chunk.output_index for chunk in sampling])
        self._last_sampled = tokens
        self._last_sample_index = {chunk.request: i for i, chunk in enumerate(sampling)}
        return PendingTokens(tokens, logprobs)

    def _forward(self, scheduled: SchedulerOutput):
        """Logits of the sampling rows, and the chunks they belong to."""
        logits = self.forward_step(self.host_inputs(scheduled))
        return logits, [chunk for chunk in scheduled.chunks if chunk.samples]

    def forward_step(self, step: HostStep) -> torch.Tensor:
        """Logits of a step's sampling rows; tensor-parallel workers run just this, with rank 0's step."""
        batch = self.device_inputs(step)
        if self._graph_fits(batch):
            logits = self.graphs.replay(batch.input_ids, batch.positions, batch.meta.slot_mapping,
                                        batch.meta.seq_lens, batch.meta.block_tables)
        else:
            hidden = self.model(batch.input_ids, batch.positions, batch.meta, self.kv_caches)
            logits = self.model.compute_logits(hidden[batch.sample_rows], float32=False)
        return logits

    def _graph_fits(self, batch: BatchInputs) -> bool:
        meta = batch.meta
        return (self.graphs is not None and meta.decode_only
                and self.graphs.fits(meta.num_seqs, meta.block_tables.shape[1]))

    def prepare_inputs(self, scheduled: SchedulerOutput) -> BatchInputs:
        return self.device_inputs(self.host_inputs(scheduled))

    def host_inputs(self, scheduled: SchedulerOutput) -> HostStep:
        """The step's integer inputs on the host: what tensor-parallel rank 0 broadcasts to its workers."""
        host = build_host_inputs(scheduled.chunks, self.block_size)
        tables = host.block_tables
        sources = self._placeholder_sources(host.placeholder_requests)
        parts = [host.token_ids, host.positions, host.slots, host.query_start, host.seq_lens, host.sample_rows,
                 tables.ravel(), host.placeholder_rows, sources]
        return HostStep(parts, tuple(tables.shape), host.max_query_len)

    def device_inputs(self, step: HostStep) -> BatchInputs:
        ids, pos, slot_mapping, qsl, lens, rows, flat_tables, fill_rows, fill_sources = self._to_device(step.parts)
        if len(step.parts[-1]):
            self._fill_placeholders(ids, fill_rows, fill_sources)
        seq_lens = np.asarray(step.parts[4]).tolist()
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, query_start_loc=qsl.to(torch.int32), seq_lens=lens.to(torch.int32),
            block_tables=flat_tables.to(torch.int32).view(step.table_shape), max_query_len=step.max_query_len,
            max_seq_len=max(seq_lens), query_start_loc_cpu=np.asarray(step.parts[3]).tolist(), seq_lens_cpu=seq_lens)
        return BatchInputs(ids, pos, meta, rows)

    def _fill_placeholders(self, ids: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor) -> None:
        """Async scheduling's placeholder tokens, on the device, queued behind the step that sampled them: no
        host sync. Only rank 0 samples, so under tensor parallelism it sends the filled ids to the others."""
        if self.parallel is None or self.parallel.is_driver:
            ids[rows] = self._last_sampled[sources]
        if self.parallel is not None:
            self.parallel.broadcast_from_driver_(ids)

    def _placeholder_sources(self, requests: list[Request]) -> list[int]:
        """Row in the last launched step's sampled ids of each placeholder token."""
        missing = [r.request_id for r in requests if r not in self._last_sample_index]
        if missing:
            raise RuntimeError(f"placeholder tokens of {missing} were not sampled by the last launched step")
        return [self._last_sample_index[r] for r in requests]

    def _to_device(self, parts: list) -> list[torch.Tensor]:
        """One host-to-device copy for all of a step's integer inputs: each copy costs ~10 us of launch and
        pinning, which at batch 1 is a visible share of a 6 ms step. Parts are lists or numpy arrays."""
        sizes = [len(part) for part in parts]
        host = torch.from_numpy(np.concatenate([np.asarray(part, dtype=np.int64) for part in parts]))
        if self.device.type == "cuda":
            host = host.pin_memory().to(self.device, non_blocking=True)
        return list(host.split(sizes))


@torch.no_grad()
def fill_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Benchmark weights: normal(0, 0.02) like HF's init, norms at 1, so activations stay in range."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
