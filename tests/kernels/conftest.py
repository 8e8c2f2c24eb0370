"""Kernel tests: real kernels on CUDA, the Triton interpreter on CPU.

TRITON_INTERPRET must be set before the kernels are first launched (backend/kernels/_jit.py defers the
@triton.jit decoration to the first launch, so importing the engine earlier does no harm).
"""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.runtime.interpreter")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
