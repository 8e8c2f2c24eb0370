"""generate_repo --instances/--gpus/--tp: the instance_group Triton gets, each instance's GPUs, and the
combinations refused at generate time (naming the option)."""
from __future__ import annotations

import re

import pytest

import tools.generate_repo as gen
from backend.engine.parallel.placement import instance_device_ids
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ck") / "llama")  # 4 heads, 2 KV heads


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(gen, "visible_gpu_count", lambda: 4)


def generate(tmp_path, checkpoint, *argv) -> str:
    out = tmp_path / "repo"
    assert gen.main(["--output-dir", str(out), "--quiet", "--model", str(checkpoint), *argv]) == 0
    return (out / "llm" / "config.pbtxt").read_text()


def instance_group(text: str) -> str:
    return re.search(r"instance_group \[(.*?)\n\]\n", text, re.S).group(1)


def parameter(text: str, key: str) -> str:
    return re.search(rf'key: "{key}"\n    value: {{ string_value: "(.*?)" }}', text).group(1)


def test_default_stays_one_instance_not_on_gpus(tmp_path, checkpoint):
    text = generate(tmp_path, checkpoint)
    group = instance_group(text)
    assert "count: 1" in group and "KIND_GPU" not in group and "gpus" not in group
    assert parameter(text, "tensor_parallel_size") == "1" and parameter(text, "instance_gpu_groups") == ""


def test_cpu_device_keeps_kind_cpu(tmp_path, checkpoint):
    group = instance_group(generate(tmp_path, checkpoint, "--instance-kind", "cpu", "--instances", "2"))
    assert "count: 2" in group and "kind: KIND_CPU" in group and "gpus" not in group


def test_replicas_one_instance_per_listed_gpu(tmp_path, checkpoint, four_gpus):
    text = generate(tmp_path, checkpoint, "--instances", "2", "--gpus", "1,3")
    group = instance_group(text)
    # Triton starts `count` instances on *each* listed GPU: count 1 over two GPUs is two instances.
    assert "count: 1" in group and "kind: KIND_GPU" in group and "gpus: [ 1, 3 ]" in group
    assert parameter(text, "instance_gpu_groups") == "1;3"


def test_two_instances_of_tp2_over_four_gpus(tmp_path, checkpoint, four_gpus):
    text = generate(tmp_path, checkpoint, "--instances", "2", "--tp", "2", "--gpus", "0,1,2,3")
    assert "gpus: [ 0, 2 ]" in instance_group(text) and "count: 1" in instance_group(text)
    assert parameter(text, "tensor_parallel_size") == "2"
    groups = parameter(text, "instance_gpu_groups")
    assert groups == "0,1;2,3"
    # what each instance's engine then uses (backend/model.py passes Triton's device id)
    assert instance_device_ids("GPU", 0, groups, 2) == "0,1"
    assert instance_device_ids("GPU", 2, groups, 2) == "2,3"
    assert instance_device_ids("CPU", 0, groups, 2) is None


def test_tp_without_gpus_takes_the_first_ones(tmp_path, checkpoint, four_gpus):
    text = generate(tmp_path, checkpoint, "--tp", "2")
    assert "gpus: [ 0 ]" in instance_group(text) and parameter(text, "instance_gpu_groups") == "0,1"


@pytest.mark.parametrize("argv, named", [
    (["--instances", "2", "--gpus", "0,1,2"], "--gpus: lists 3 GPUs, but --instances 2 x --tp 1 needs 2"),
    (["--instances", "2", "--tp", "2", "--gpus", "0,1"], "--gpus: lists 2 GPUs, but --instances 2 x --tp 2 needs 4"),
    (["--gpus", "0,0"], "--gpus: GPU ids must be distinct"),
    (["--instances", "2", "--gpus", "3,4"], "--gpus: GPU 4 does not exist (4 visible"),
    (["--tp", "2", "--instances", "3"], "--gpus: GPU 5 does not exist"),
    (["--tp", "3", "--gpus", "0,1,2"], "--tp/--tensor-parallel-size: 3 does not divide the model's attention heads (4)"),
    (["--tp", "4", "--gpus", "0,1,2,3"], "--tp/--tensor-parallel-size: 4 does not divide the model's KV heads (2)"),
    (["--tp", "0"], "--tp/--tensor-parallel-size: must be a positive integer"),
    (["--device", "cpu", "--gpus", "0"], "--gpus: only with --instance-kind gpu"),
])
def test_invalid_combinations_exit_2_naming_the_option(tmp_path, cli_error, checkpoint, four_gpus, argv, named):
    argv = ["--output-dir", str(tmp_path / "repo"), "--quiet", "--model", str(checkpoint)] + argv
    code, err = cli_error(gen.main, argv)
    assert code == 2 and named in err, err
    assert not (tmp_path / "repo").exists()
