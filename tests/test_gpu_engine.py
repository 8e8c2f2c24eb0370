"""The engine on CUDA: Triton kernels and CUDA graphs against transformers and against eager decode."""
from __future__ import annotations

import pytest
import torch

from backend.engine.config import EngineConfig
from backend.engine.engine import LLMEngine
from backend.engine.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Head dim 64 and GQA 4:1, like the real models, but small enough to build in a second.
GPU_SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=1024, vocab_size=2048, max_position_embeddings=1024,
                 initializer_range=0.02)  # real models' init scale, so bf16 rounding stays at its usual size


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint("llama2", tmp_path_factory.mktemp("gpu-llama"), **GPU_SHAPE)


def make_engine(path, **overrides) -> LLMEngine:
    settings = dict(model=str(path), device="cuda", dtype="bfloat16", kv_cache_memory_mb=256, max_num_seqs=16)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(10, 2048, (int(length),), generator=gen).tolist()
            for length in torch.randint(5, 200, (n,), generator=gen)]


def test_logits_match_transformers_in_bf16(checkpoint):
    from transformers import AutoModelForCausalLM

    engine = make_engine(checkpoint, use_cuda_graphs=False)
    prompt = prompts(1)[0]
    engine.add_request("a", prompt, SamplingParams(max_tokens=1))
    batch = engine.runner.prepare_inputs(engine.scheduler.schedule())
    hidden = engine.runner.model(batch.input_ids, batch.positions, batch.meta, engine.runner.kv_caches)
    ours = engine.runner.model.compute_logits(hidden).float()
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda()
    ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
    assert ((ours - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_cuda_graphs_change_no_greedy_output(checkpoint, batch):
    """Batch sizes that are buckets, and equal lengths, so eager and graph runs multiply the same shapes."""
    work = prompts(batch)
    params = SamplingParams(max_tokens=40, min_tokens=40)
    graphed = make_engine(checkpoint)
    assert graphed.runner.graphs is not None and graphed.runner.warmup_seconds > 0
    eager = make_engine(checkpoint, use_cuda_graphs=False)
    assert graphed.generate(work, params) == eager.generate(work, params)


@pytest.mark.parametrize("batch", [1, 8])
def test_async_scheduling_changes_no_greedy_output(checkpoint, batch):
    """Same batches every step in both modes (all arrive together, stop by length), so bf16 numerics match;
    the device-side placeholder fill and the event-synchronized token copy are what is tested."""
    work = prompts(batch)
    params = SamplingParams(max_tokens=40, min_tokens=40)
    overlapped = make_engine(checkpoint, async_scheduling=True)
    reference = make_engine(checkpoint, async_scheduling=False)
    assert overlapped.generate(work, params) == reference.generate(work, params)
