"""One real tritonserver per test session, on a repository generated for the bundled SmolLM2 (CPU, float32)."""
from __future__ import annotations

import pytest

from tests.triton_helpers import running_server
from tools.generate_repo import main as generate_repo


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory, smollm2_dir):
    repo = tmp_path_factory.mktemp("serving") / "model_repo"
    assert generate_repo(["--output-dir", str(repo), "--quiet", "--kv-cache-mb", "128", "--device", "cpu"]) == 0
    return repo


@pytest.fixture(scope="session")
def server(model_repo, tmp_path_factory):
    yield from running_server(model_repo, tmp_path_factory.mktemp("serving-log") / "tritonserver.log")
