"""One real tritonserver per test session, on a repository generated for the bundled SmolLM2 (CPU, float32)."""
from __future__ import annotations

import pytest

from tests.triton_helpers import generate_smollm2_repo, running_server


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory, smollm2_dir):
    return generate_smollm2_repo(tmp_path_factory.mktemp("serving") / "model_repo")


@pytest.fixture(scope="session")
def server(model_repo, tmp_path_factory):
    yield from running_server(model_repo, tmp_path_factory.mktemp("serving-log") / "tritonserver.log")
