"""Fixtures for the OpenAI frontend tests: a real tritonserver on the bundled SmolLM2 (CPU) and the frontend
started by its own CLI next to it. Imported by tests/test_openai_frontend.py (module scope: one server and one
frontend for the module)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.triton_helpers import free_ports, generate_smollm2_repo, running_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def oai_repo(tmp_path_factory, smollm2_dir):
    return generate_smollm2_repo(tmp_path_factory.mktemp("openai") / "model_repo")


@pytest.fixture(scope="module")
def oai_triton(oai_repo, tmp_path_factory):
    yield from running_server(oai_repo, tmp_path_factory.mktemp("openai-log") / "tritonserver.log")


@pytest.fixture(scope="module")
def frontend(oai_repo, oai_triton, tmp_path_factory):
    """The frontend by its CLI; yields its base URL (http://127.0.0.1:PORT/v1)."""
    (port,) = free_ports(1)
    log = tmp_path_factory.mktemp("openai-frontend-log") / "frontend.log"
    cmd = [sys.executable, "-m", "clients.openai_frontend", "--model-repository", str(oai_repo), "--triton-url",
           oai_triton.grpc_url, "--host", "127.0.0.1", "--port", str(port), "--max-body-bytes", str(1 << 20)]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", process, timeout=120)
    except Exception:
        process.kill()
        print(log.read_text()[-5000:])
        raise
    yield f"http://127.0.0.1:{port}/v1"
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the frontend exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the frontend was not healthy after {timeout:.0f} s")
