import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

# On a machine without CUDA, Triton kernels can only run interpreted, and triton fixes its language helpers
# (tl.sum, ...) to compile or interpret when it is first imported, which any engine import does. Set it here,
# before any test module is collected, so the outcome does not depend on which files a run selects.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def cli_error(capsys):
    """Runs a tool's main(argv) that must stop with an argparse-style error: (exit code, stderr)."""
    def run(main, argv):
        with pytest.raises(SystemExit) as info:
            main(argv)
        return info.value.code, capsys.readouterr().err

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny random-weight checkpoint of an architecture, made once per test session."""
    from tests.tiny_models import make_tiny_checkpoint

    made = {}

    def get(arch: str):
        if arch not in made:
            made[arch] = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled SmolLM2 converted to a HF-style checkpoint (cached across sessions)."""
    from backend.engine.checkpoint import resolve_checkpoint

    return resolve_checkpoint(None)
