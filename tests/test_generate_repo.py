"""The model repository generator: templates with named variables, options validated with messages that
name them, and a complete repository (loading it in tritonserver is tested in tests/serving/)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from backend.engine.config import EngineConfig
from backend.engine.errors import InvalidParameterError
from tools import generate_repo as gen

INTERFACE_INPUTS = {
    "text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "stream": "TYPE_BOOL",
    "exclude_input_in_output": "TYPE_BOOL", "bad_words": "TYPE_STRING", "stop_words": "TYPE_STRING",
    "end_id": "TYPE_INT32", "pad_id": "TYPE_INT32", "top_k": "TYPE_INT32", "min_tokens": "TYPE_INT32",
    "min_length": "TYPE_INT32", "beam_width": "TYPE_INT32", "num_return_sequences": "TYPE_INT32",
    "temperature": "TYPE_FP32", "top_p": "TYPE_FP32", "length_penalty": "TYPE_FP32",
    "repetition_penalty": "TYPE_FP32", "presence_penalty": "TYPE_FP32", "frequency_penalty": "TYPE_FP32",
    "seed": "TYPE_UINT64", "random_seed": "TYPE_UINT64", "return_log_probs": "TYPE_BOOL",
    "return_context_logits": "TYPE_BOOL", "return_generation_logits": "TYPE_BOOL",
    "return_perf_metrics": "TYPE_BOOL", "return_num_input_tokens": "TYPE_BOOL",
    "return_num_output_tokens": "TYPE_BOOL", "embedding_bias_words": "TYPE_STRING",
    "embedding_bias_weights": "TYPE_FP32",
}
INTERFACE_OUTPUTS = {
    "text_output": ("TYPE_STRING", "[ -1 ]"), "cum_log_probs": ("TYPE_FP32", "[ -1 ]"),
    "output_log_probs": ("TYPE_FP32", "[ -1, -1 ]"), "num_input_tokens": ("TYPE_INT32", "[ 1 ]"),
    "num_output_tokens": ("TYPE_INT32", "[ 1 ]"), "arrival_time_ns": ("TYPE_INT64", "[ 1 ]"),
    "first_token_time_ns": ("TYPE_INT64", "[ 1 ]"), "last_token_time_ns": ("TYPE_INT64", "[ 1 ]"),
    "kv_cache_alloc_new_blocks": ("TYPE_INT32", "[ 1 ]"), "kv_cache_reused_blocks": ("TYPE_INT32", "[ 1 ]"),
    # the TensorRT-LLM ensemble's row of a request that carries several prompts, and sequence of a prompt that
    # asks for several (num_return_sequences): each sent only then
    "batch_index": ("TYPE_INT32", "[ 1 ]"), "sequence_index": ("TYPE_INT32", "[ 1 ]"),
}


def test_fill_template_replaces_named_variables():
    assert gen.fill_template("a ${x} b ${y}", {"x": "1", "y": "2"}, "t") == "a 1 b 2"


def test_missing_variable_is_an_error_naming_it():
    with pytest.raises(gen.TemplateError, match="t: no value for template variable.*y"):
        gen.fill_template("${x} ${y}", {"x": "1"}, "t")


def test_unknown_variable_is_an_error_naming_it(tmp_path):
    for model in gen.TEMPLATE_MODELS:
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.pbtxt").write_text(f'name: "${{name_{model}}}"')
    values = {f"name_{m}": m for m in gen.TEMPLATE_MODELS}
    gen.render_configs(values, tmp_path)
    with pytest.raises(gen.TemplateError, match="unknown template variable.*max_batchsize"):
        gen.render_configs({**values, "max_batchsize": "4"}, tmp_path)


def parse_blocks(text: str, section: str) -> dict[str, dict]:
    """{name: {data_type, dims, optional}} of a config's input or output list."""
    body = text.split(f"{section} [", 1)[1].split("\n]", 1)[0]
    blocks = {}
    for block in re.findall(r"\{(.*?)\n  \}", body, re.S):
        name = re.search(r'name: "(\w+)"', block).group(1)
        blocks[name] = dict(data_type=re.search(r"data_type: (\w+)", block).group(1),
                            dims=re.search(r"dims: (\[.*?\])", block).group(1),
                            optional="optional: true" in block)
    return blocks


def test_ensemble_has_exactly_the_interface(tmp_path):
    text = (gen.TEMPLATES / "ensemble" / "config.pbtxt").read_text()
    inputs, outputs = parse_blocks(text, "input"), parse_blocks(text, "output")
    assert {k: v["data_type"] for k, v in inputs.items()} == INTERFACE_INPUTS
    assert {k: v for k, v in inputs.items() if not v["optional"]}.keys() == {"text_input", "max_tokens"}
    assert {k for k, v in inputs.items() if v["dims"] == "[ -1 ]"} == {
        "bad_words", "stop_words", "embedding_bias_words", "embedding_bias_weights"}
    assert {k: (v["data_type"], v["dims"]) for k, v in outputs.items()} == INTERFACE_OUTPUTS


@pytest.mark.parametrize("argv, named", [
    (["--max-batch-size", "0"], "--max-batch-size/--max-num-seqs: must be a positive integer, got 0"),
    (["--max-seq-len", "-5"], "--max-seq-len/--max-model-len"),
    (["--kv-cache-mb", "0"], "--kv-cache-mb/--kv-cache-memory-mb"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--dtype", "float8"], "--dtype: invalid choice"),
    (["--block-size", "x"], "--block-size: invalid int value"),
    (["--instances", "0"], "--instances: must be a positive integer"),
    (["--responder-threads", "0"], "--responder-threads: expected a whole number of at least 1, got '0'"),
    (["--instance-kind", "cpu", "--gpus", "0,1"], "--gpus: only with --instance-kind gpu"),
    (["--bogus-option", "1"], "unrecognized arguments: --bogus-option"),
    (["--quant-lm-head"], "--quant-lm-head: needs --quant"),
    (["--quant", "int4_awq", "--quant-group-size", "100"], "--quant-group-size: must be a power of two >= 32, got 100"),
    (["--quant", "int4_awq", "--calib-file", "/no/such.txt"], "--calib-file: /no/such.txt: no such file"),
] + ([] if torch.cuda.is_available() else [
    (["--quant", "fp8", "--quant-device", "cuda"], "--quant-device: cuda asked for calibration, but this machine has 0"),
]))
def test_bad_options_exit_2_naming_them(tmp_path, cli_error, argv, named):
    code, err = cli_error(gen.main, ["--output-dir", str(tmp_path / "repo")] + argv)
    assert code == 2 and named in err
    assert not (tmp_path / "repo").exists()


def test_every_engine_setting_is_an_option():
    parser = gen.build_parser()
    dests = {action.dest for action in parser._actions}
    assert {f.name for f in dataclasses.fields(EngineConfig)} - {"model"} <= dests


def test_non_empty_output_dir_needs_force(tmp_path, cli_error):
    (tmp_path / "keep.txt").write_text("x")
    code, err = cli_error(gen.main, ["--output-dir", str(tmp_path)])
    assert code == 2 and "--force" in err


def test_generated_repository(tmp_path):
    out = tmp_path / "repo"
    assert gen.main(["--output-dir", str(out), "--quiet", "--max-batch-size", "8", "--max-seq-len", "1024",
                     "--kv-cache-mb", "64", "--apply-chat-template", "--no-enable-prefix-caching"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ensemble", "llm", "postprocessing", "preprocessing", "vllm_model"]
    engine_config = (out / "llm" / "config.pbtxt").read_text()
    assert 'backend: "tritium"' in engine_config and "decoupled: true" in engine_config
    for key, value in [("max_num_seqs", "8"), ("max_model_len", "1024"), ("kv_cache_memory_mb", "64.0"),
                       ("enable_prefix_caching", "false"), ("model", "1/checkpoint")]:
        assert f'key: "{key}"\n    value: {{ string_value: "{value}" }}' in engine_config
    checkpoint = out / "llm" / "1" / "checkpoint"
    assert (checkpoint / "config.json").is_file() and list(checkpoint.glob("*.safetensors"))
    assert not [p for p in checkpoint.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
    assert (out / "preprocessing" / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert 'string_value: "true"' in (out / "preprocessing" / "config.pbtxt").read_text()
    assert "${" not in "".join(p.read_text() for p in out.glob("*/config.pbtxt"))
    assert "max_batch_size: 8" in (out / "ensemble" / "config.pbtxt").read_text()
    vllm = (out / "vllm_model" / "config.pbtxt").read_text()  # the vLLM backend's interface: no batch dimension
    assert "max_batch_size: 0" in vllm and 'string_value: "llm"' in vllm and "decoupled: true" in vllm


def test_engine_model_name_is_followed_by_the_models_that_call_it(tmp_path, cli_error):
    out = tmp_path / "repo"
    assert gen.main(["--output-dir", str(out), "--quiet", "--kv-cache-mb", "64", "--engine-model-name", "engine"]) == 0
    assert (out / "engine" / "config.pbtxt").is_file() and not (out / "llm").exists()
    assert 'model_name: "engine"' in (out / "ensemble" / "config.pbtxt").read_text()
    assert 'string_value: "engine"' in (out / "vllm_model" / "config.pbtxt").read_text()
    code, err = cli_error(gen.main, ["--output-dir", str(tmp_path / "other"), "--engine-model-name", "vllm_model"])
    assert code == 2 and "--engine-model-name" in err


def test_generated_engine_parameters_load_back(tmp_path):
    from backend.serving.engine_settings import from_parameters, responder_threads, serving_settings

    out = tmp_path / "repo"
    assert gen.main(["--output-dir", str(out), "--quiet", "--max-batch-size", "3", "--seed", "9",
                     "--responder-threads", "2"]) == 0
    text = (out / "llm" / "config.pbtxt").read_text()
    params = dict(re.findall(r'key: "(\w+)"\n    value: \{ string_value: "(.*?)" \}', text))
    config = from_parameters(params, str(out / "llm"))
    assert config.max_num_seqs == 3 and config.seed == 9
    assert responder_threads(serving_settings(params)) == 2
    assert Path(config.model) == out / "llm" / "1" / "checkpoint"


@pytest.mark.parametrize("head_args", [[], ["--quant-lm-head"]])
def test_quant_writes_a_quantized_checkpoint_the_engine_serves(tmp_path, tiny_checkpoint, head_args, capsys):
    import json

    from backend.engine.engine import LLMEngine
    from backend.engine.sampling_params import SamplingParams

    source = tiny_checkpoint("llama")
    out = tmp_path / "repo"
    assert gen.main(["--output-dir", str(out), "--model", str(source), "--quiet", "--quant", "int8_wo",
                     "--kv-cache-mb", "16", *head_args]) == 0
    checkpoint = out / "llm" / "1" / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert config["method"] == "int8_wo" and config["lm_head"] == bool(head_args)
    head = ", LM head w8a16" if head_args else ""
    assert f"quantized int8_wo (w8a16{head})" in capsys.readouterr().out
    size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
    assert size(checkpoint) < size(Path(source))
    assert not list(out.glob(".quantizing-*"))  # the scratch folder is gone; only the four models remain
    assert sorted(p.name for p in out.iterdir()) == ["ensemble", "llm", "postprocessing", "preprocessing", "vllm_model"]
    engine = LLMEngine(EngineConfig(model=str(checkpoint), kv_cache_memory_mb=16))
    assert len(engine.generate([[1, 5, 9, 3]], SamplingParams(max_tokens=6, min_tokens=6))[0]) == 6


def test_quant_with_dummy_weights_is_refused(tmp_path, cli_error):
    code, err = cli_error(gen.main, ["--output-dir", str(tmp_path / "r"), "--quant", "int8_wo",
                                     "--load-format", "dummy"])
    assert code == 2 and "--quant" in err


@pytest.mark.parametrize("value, expected", [("", 4), ("1", 1), ("8", 8), ("0", None), ("many", None)])
def test_responder_threads_setting(value, expected):
    from backend.serving.engine_settings import responder_threads

    if expected is None:
        with pytest.raises(InvalidParameterError, match="responder_threads: expected a whole number"):
            responder_threads({"responder_threads": value})
    else:
        assert responder_threads({"responder_threads": value} if value else {}) == expected


@pytest.mark.parametrize("groups, expected", [
    (None, 1), ([{"count": 1, "kind": "KIND_MODEL"}], 1), ([{"count": 2, "kind": "KIND_CPU"}], 2),
    ([{"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]}], 2), ([{"count": 2, "kind": "KIND_GPU", "gpus": [0, 2, 3]}], 6),
])
def test_declared_instances(groups, expected):
    from backend.serving.engine_settings import declared_instances

    assert declared_instances({} if groups is None else {"instance_group": groups}) == expected
