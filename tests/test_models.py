"""Our Llama-family model against transformers on the same tiny random weights (float32, CPU, torch ops).

Each test drives the model the way the runner will: new tokens of one or more sequences flattened into one
batch, with AttentionMetadata over a small paged KV cache whose blocks are deliberately not in order.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass, field

import pytest
import torch

if not torch.cuda.is_available():
    # Before backend.engine imports triton (backend/kernels import triton.language): triton's own @jit
    # helpers (tl.sum, ...) are fixed to compile or interpret when triton is imported, and on CPU only the
    # interpreter can run them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from backend.engine.attention_metadata import AttentionMetadata
from backend.engine.checkpoint import iter_safetensors, load_model
from backend.engine.errors import UnsupportedModelError
from backend.engine.model_config import ModelConfig
from backend.engine.models import build_model, supported_architectures
from backend.engine.models.llama import compute_cos_sin_cache
from backend.engine.ops import REFERENCE_OPS
from tests.tiny_models import ARCHS, make_tiny_checkpoint

BLOCK_SIZE = 4
NUM_BLOCKS = 48
RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@dataclass
class Seq:
    tokens: list[int]  # the whole sequence, prompt and tokens to decode
    blocks: list[int]
    computed: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)


class Driver:
    """Feeds steps of (sequence, number of new tokens) through the model, as a runner would."""

    def __init__(self, model, cfg: ModelConfig, seed: int = 0, device: str = "cpu"):
        self.model, self.device = model, device
        self.kv_caches = [torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, device=device)
                          for _ in range(cfg.num_layers)]
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)  # scattered blocks catch block-table mistakes

    def new_seq(self, tokens: list[int]) -> Seq:
        n = -(-len(tokens) // BLOCK_SIZE)
        blocks, self.free = self.free[:n], self.free[n:]
        return Seq(tokens, blocks)

    def step(self, work: list[tuple[Seq, int]]) -> None:
        ids, pos, slots, starts, lens = [], [], [], [0], []
        for seq, n in work:
            for p in range(seq.computed, seq.computed + n):
                ids.append(seq.tokens[p])
                pos.append(p)
                slots.append(seq.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
            starts.append(starts[-1] + n)
            lens.append(seq.computed + n)
        width = max(len(s.blocks) for s, _ in work)
        dev = self.device
        tables = [s.blocks + [0] * (width - len(s.blocks)) for s, _ in work]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_query_len=max(n for _, n in work), max_seq_len=max(lens),
            query_start_loc_cpu=starts, seq_lens_cpu=lens)
        with torch.no_grad():
            hidden = self.model.forward(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta,
                                        self.kv_caches)
            logits = self.model.compute_logits(hidden).cpu()
        assert hidden.shape == (len(ids), self.model.config.hidden_size)
        assert logits.dtype == torch.float32
        for b, (seq, n) in enumerate(work):
            seq.logits.append(logits[starts[b]:starts[b + 1]])
            seq.computed += n


def hf_logits(path, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def ours(path):
    model, cfg = load_model(path, REFERENCE_OPS, torch.float32, "cpu")
    return model, cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_checkpoint(arch, root / arch) for arch in ARCHS}


def check_prefill_then_decode(path, model, cfg, prompt_len: int, decode_steps: int, seed: int = 1,
                              device: str = "cpu"):
    tokens = random_tokens(prompt_len + decode_steps, cfg.vocab_size, seed)
    ref = hf_logits(path, tokens)
    driver = Driver(model, cfg, device=device)
    seq = driver.new_seq(tokens)
    driver.step([(seq, prompt_len)])
    for _ in range(decode_steps):
        driver.step([(seq, 1)])
    ours_all = torch.cat(seq.logits)
    errors = [rel_err(ours_all[:prompt_len], ref[:prompt_len])]
    errors += [rel_err(ours_all[i], ref[i]) for i in range(prompt_len, prompt_len + decode_steps)]
    return errors


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_and_decode_match_transformers(checkpoints, arch):
    model, cfg = ours(checkpoints[arch])
    errors = check_prefill_then_decode(checkpoints[arch], model, cfg, prompt_len=20, decode_steps=4)
    assert max(errors) < RTOL, errors


@pytest.mark.parametrize("arch", ["llama", "qwen2", "smol"])
def test_mixed_batch_of_two_sequences(checkpoints, arch):
    """A: 20-token prefill then decode. B: 13-token prompt in two chunks (8, then 5 after a cached prefix)
    batched with A's decode, then both decode together."""
    path = checkpoints[arch]
    model, cfg = ours(path)
    a_tokens, b_tokens = random_tokens(23, cfg.vocab_size, 2), random_tokens(15, cfg.vocab_size, 3)
    driver = Driver(model, cfg, seed=5)
    a, b = driver.new_seq(a_tokens), driver.new_seq(b_tokens)
    driver.step([(a, 20), (b, 8)])
    driver.step([(a, 1), (b, 5)])
    driver.step([(b, 1), (a, 1)])  # order in the batch need not be stable
    driver.step([(a, 1), (b, 1)])
    for seq, tokens in ((a, a_tokens), (b, b_tokens)):
        got = torch.cat(seq.logits)
        assert got.shape[0] == len(tokens)
        assert rel_err(got, hf_logits(path, tokens)) < RTOL


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_model_runs_through_triton_kernels(checkpoints, arch):
    """The same model with the Triton KernelOps: compiled on a GPU, interpreted on CPU (float32 both)."""
    from backend.kernels.triton_ops import TRITON_OPS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_model(checkpoints[arch], TRITON_OPS, torch.float32, device)
    errors = check_prefill_then_decode(checkpoints[arch], model, cfg, prompt_len=20, decode_steps=3, device=device)
    # On the GPU, tl.dot on float32 may use TF32 (10-bit mantissa): about 1e-3 relative.
    assert max(errors) < (RTOL if device == "cpu" else 5e-3), errors


def test_llama3_rope_scaling_past_original_context(checkpoints):
    """Positions up to 63 with original_max_position_embeddings=32; the same model with plain RoPE must
    fail the same check, so the test can tell the scaling apart."""
    path = checkpoints["llama"]
    model, cfg = ours(path)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["original_max_position_embeddings"] == 32
    errors = check_prefill_then_decode(path, model, cfg, prompt_len=56, decode_steps=8, seed=7)
    assert max(errors) < RTOL, errors

    model.config.rope_scaling = None
    model.init_rotary()
    wrong = check_prefill_then_decode(path, model, cfg, prompt_len=56, decode_steps=8, seed=7)
    assert min(wrong[1:]) > 100 * RTOL, wrong


def test_cos_sin_cache_matches_transformers_rotary(checkpoints):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = ModelConfig.from_dir(checkpoints["llama"])
    rotary = LlamaRotaryEmbedding(AutoConfig.from_pretrained(checkpoints["llama"]))
    positions = torch.arange(200)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    ours_table = compute_cos_sin_cache(cfg.head_dim, cfg.rope_theta, 200, cfg.rope_scaling)
    half = cfg.head_dim // 2
    torch.testing.assert_close(ours_table, torch.cat((cos[0, :, :half], sin[0, :, :half]), -1), atol=1e-6, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    path = make_tiny_checkpoint("llama2", tmp_path / "sharded", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    model, cfg = ours(path)
    errors = check_prefill_then_decode(path, model, cfg, prompt_len=12, decode_steps=2)
    assert max(errors) < RTOL, errors


def test_qwen2_has_qkv_bias_and_smol_ties_embeddings(checkpoints):
    qwen, _ = ours(checkpoints["qwen2"])
    assert qwen.model.layers[0].self_attn.qkv_proj.bias is not None
    smol, cfg = ours(checkpoints["smol"])
    assert cfg.tie_word_embeddings and smol.lm_head is None


def test_unsupported_architecture_names_it_and_lists_supported(checkpoints, tmp_path):
    config = json.loads((checkpoints["llama2"] / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig.from_dir(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        build_model(cfg, REFERENCE_OPS, torch.float32, "cpu")
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    assert all(name in message for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"))
    assert supported_architectures() == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]


def test_load_weights_reports_missing_and_unexpected(checkpoints):
    path = checkpoints["llama2"]
    cfg = ModelConfig.from_dir(path)
    weights = dict(iter_safetensors(path))
    model = build_model(cfg, REFERENCE_OPS, torch.float32, "cpu")
    partial = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        model.load_weights(partial.items())
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.self_attn.q_proj.bias'"):
        model.load_weights([("model.layers.0.self_attn.q_proj.bias", torch.zeros(64))])
    with pytest.raises(ValueError, match="shape"):
        model.load_weights([("model.norm.weight", torch.zeros(65))])
    model.load_weights([*weights.items(), ("model.rotary_emb.inv_freq", torch.zeros(8))])  # ignored buffer


def test_bfloat16_model_keeps_float32_rotary_and_logits(checkpoints):
    model, _ = load_model(checkpoints["smol"], REFERENCE_OPS, torch.bfloat16, "cpu")
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert model.cos_sin_cache.dtype == torch.float32
    assert model.compute_logits(torch.zeros(2, 64, dtype=torch.bfloat16)).dtype == torch.float32


# ---- ModelConfig parsing ------------------------------------------------------------------------------------------

LEGACY = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
              max_position_embeddings=131072, rope_theta=500000.0, torch_dtype="bfloat16",
              eos_token_id=[128001, 128008, 128009], bos_token_id=128000,
              rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"})


def test_model_config_reads_transformers4_llama31_layout():
    cfg = ModelConfig.from_dict(LEGACY, {"eos_token_id": [128001, 128009], "bos_token_id": 128000})
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 8, 128)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 8.0
    assert cfg.eos_token_ids == [128001, 128009]  # generation_config wins over config.json
    assert cfg.torch_dtype == "bfloat16" and not cfg.attention_bias and not cfg.tie_word_embeddings
    assert ModelConfig.from_dict(LEGACY).eos_token_ids == [128001, 128008, 128009]


def test_model_config_defaults_and_qwen2_bias():
    qwen = {**LEGACY, "architectures": ["Qwen2ForCausalLM"], "rope_scaling": None, "sliding_window": 4096,
            "use_sliding_window": False, "eos_token_id": 151645}
    cfg = ModelConfig.from_dict(qwen)
    assert cfg.attention_bias and cfg.rope_scaling is None and cfg.sliding_window is None
    assert cfg.eos_token_ids == [151645]
    mistral = {**LEGACY, "architectures": ["MistralForCausalLM"], "rope_scaling": None, "sliding_window": 4096}
    assert ModelConfig.from_dict(mistral).max_model_len == 4096


@pytest.mark.parametrize("rope", [{"type": "yarn", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}])
def test_model_config_rejects_other_rope_scaling(rope):
    with pytest.raises(UnsupportedModelError, match="not supported; supported: default, llama3"):
        ModelConfig.from_dict({**LEGACY, "rope_scaling": rope})
