"""The engine end to end on CPU: greedy outputs equal transformers', and batching changes nothing."""
from __future__ import annotations

import threading

import pytest
import torch

from backend.engine.async_engine import AsyncEngine
from backend.engine.config import EngineConfig
from backend.engine.engine import LLMEngine
from backend.engine.errors import InvalidParameterError
from backend.engine.model_config import ModelConfig
from backend.engine.model_runner import kv_block_bytes
from backend.engine.sampling_params import SamplingParams

ARCHS = ["llama", "llama2", "mistral", "qwen2", "smol"]


def make_engine(path, **overrides) -> LLMEngine:
    settings = dict(model=str(path), device="cpu", dtype="float32", kv_cache_memory_mb=16)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def transformers_greedy(path, prompt: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return hf_generate(model, prompt, max_new_tokens)


def hf_generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_on_tiny_models(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    engine = make_engine(path)
    prompts = random_prompts(engine.model_config.vocab_size, [5, 17, 33])
    params = SamplingParams(max_tokens=24, min_tokens=24)
    ours = engine.generate(prompts, params)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == transformers_greedy(path, prompt, 24)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_triton_kernels_interpreted_give_transformers_greedy_tokens(tiny_checkpoint, arch):
    """The model through the Triton ops (the interpreter on CPU): its decode steps take the decode kernel that
    does rotary and the cache write itself, its prefill steps rotary.py's kernel and the prefill kernel."""
    path = tiny_checkpoint(arch)
    engine = make_engine(path, attention_backend="triton")
    assert engine.runner.ops.rotary_decode_attention is not None
    prompts = random_prompts(engine.model_config.vocab_size, [5, 19])
    for prompt, tokens in zip(prompts, engine.generate(prompts, SamplingParams(max_tokens=6, min_tokens=6))):
        assert tokens == transformers_greedy(path, prompt, 6)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    engine = make_engine(smollm2_dir, kv_cache_memory_mb=64)
    tok = engine.tokenizer
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in questions]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    ours = engine.generate(prompts, SamplingParams(max_tokens=64, min_tokens=64))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager")
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_generate(model, prompt, 64)
    assert "Paris" in tok.decode(ours[0])


def solo_outputs(path, prompts, params_list, **overrides) -> list[list[int]]:
    return [make_engine(path, **overrides).generate([p], [params])[0] for p, params in zip(prompts, params_list)]


def staggered_outputs(engine: LLMEngine, prompts, params_list, gap: int) -> list[list[int]]:
    """Adds request i at step i * gap, while the earlier ones are running."""
    results = {str(i): [] for i in range(len(prompts))}
    pending = list(enumerate(zip(prompts, params_list)))
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] * gap <= step:
            i, (prompt, params) = pending.pop(0)
            engine.add_request(str(i), prompt, params)
        for output in engine.step():
            results[output.request_id] += output.new_token_ids
        step += 1
    return [results[str(i)] for i in range(len(prompts))]


def mixed_params(n: int) -> list[SamplingParams]:
    """Alternating greedy and seeded sampling, different lengths."""
    return [SamplingParams(max_tokens=8 + 3 * i, ignore_eos=True) if i % 2 == 0 else
            SamplingParams(max_tokens=8 + 3 * i, temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, ignore_eos=True)
            for i in range(n)]


def test_inflight_batching_changes_nothing(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = random_prompts(256, [3, 40, 9, 25, 60, 14])
    params = mixed_params(len(prompts))
    expected = solo_outputs(path, prompts, params)
    engine = make_engine(path)
    assert staggered_outputs(engine, prompts, params, gap=2) == expected
    assert engine.max_batch_size_seen >= 4


def test_preemption_and_chunked_prefill_change_nothing(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    prompts = random_prompts(256, [30, 45, 12, 50, 22])
    params = mixed_params(len(prompts))
    expected = solo_outputs(path, prompts, params)
    # 12 blocks of 8 tokens cannot hold all five requests at once, and 16 tokens a step split the prompts.
    block_bytes = kv_block_bytes(ModelConfig.from_dir(path), 8, torch.float32)
    engine = make_engine(path, block_size=8, kv_cache_memory_mb=12 * block_bytes / 2**20, max_num_batched_tokens=16)
    assert engine.runner.num_blocks == 12
    assert staggered_outputs(engine, prompts, params, gap=1) == expected
    stats = engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_prefix_caching_reuses_blocks_with_identical_output(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prefix = random_prompts(256, [96], seed=3)[0]
    first, second = prefix + [7, 8, 9], prefix + [10, 11]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine = make_engine(path)
    engine.add_request("a", first, params)
    while engine.has_unfinished():
        engine.step()
    request = engine.add_request("b", second, params)
    tokens = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens += output.new_token_ids
    assert request.num_cached_tokens >= 80
    fresh_blocks = -(-(len(second) + 12) // 16)
    assert request.num_new_blocks <= fresh_blocks - 5
    assert tokens == make_engine(path, enable_prefix_caching=False).generate([second], params)[0]


def test_prompt_longer_than_context_is_rejected(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint("llama"), max_model_len=64)
    with pytest.raises(InvalidParameterError, match="prompt"):
        engine.add_request("x", list(range(3, 80)), SamplingParams())
    with pytest.raises(InvalidParameterError, match="prompt"):
        engine.add_request("y", [], SamplingParams())
    with pytest.raises(InvalidParameterError, match="prompt"):
        engine.add_request("z", [10**6], SamplingParams())


def test_abort_frees_blocks(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint("llama"))
    engine.add_request("a", list(range(3, 50)), SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    output = engine.abort_request("a")
    assert output.finished and output.finish_reason == "abort"
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and not engine.has_unfinished()


def test_async_engine_serves_concurrent_threads(tiny_checkpoint):
    path = tiny_checkpoint("mistral")
    prompts = random_prompts(256, [4, 30, 11, 19])
    params = mixed_params(len(prompts))
    expected = solo_outputs(path, prompts, params)
    engine = AsyncEngine(EngineConfig(), engine=make_engine(path))
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        results[i] = [t for out in engine.add_request(f"r{i}", prompts[i], params[i]) for t in out.new_token_ids]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.shutdown()
    assert [results[i] for i in range(len(prompts))] == expected
