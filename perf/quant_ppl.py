"""Perplexity change of quantization methods on the bundled SmolLM2-135M over more held-out windows than
tests/test_quant_ppl.py can afford (its 4-window figure moves by a few points between near-equivalent roundings).

    python perf/quant_ppl.py --methods int4_wo int4_gptq int4_awq --eval-windows 20     # CPU, minutes per method

Each method is quantized through quantize_checkpoint (same calibration split and sample counts as the test) and
evaluated on the first --eval-windows windows of 512 tokens of the held-out split; the test's 4 windows are the
first 4, so the line prints both figures against the unquantized model of the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.checkpoint import load_model, load_tokenizer, resolve_checkpoint  # noqa: E402
from backend.engine.ops import select_ops  # noqa: E402
from backend.engine.quantization import quantize_checkpoint  # noqa: E402
from backend.engine.quantization.api import default_group_size  # noqa: E402
from backend.engine.quantization.calibration import eval_texts, token_windows  # noqa: E402
from backend.engine.quantization.perplexity import perplexity  # noqa: E402

TEST_WINDOWS = 4
CALIB_SAMPLES = {"int4_gptq": 16, "fp8": 16, "int4_awq": 16}  # as tests/test_quant_ppl.py


def nll(path: Path, windows, first: int) -> tuple[float, float]:
    """Mean next-token NLL on the first `first` windows and on all of them."""
    model, _ = load_model(path, select_ops("auto", "cpu"), "auto", "cpu")
    head = math.log(perplexity(model, windows[:first]))
    rest = math.log(perplexity(model, windows[first:])) if windows.shape[0] > first else head
    n = windows.shape[0]
    return head, (first * head + (n - first) * rest) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["int4_wo", "int4_gptq", "int4_awq"])
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=None, help="for every calibrated method (default: the test's)")
    p.add_argument("--group-size", type=int, default=None,
                   help="INT4 group size (default: the library's choice for the source, 32 for the bundled Q4_1 model)")
    args = p.parse_args()
    src = resolve_checkpoint(None)
    windows = token_windows(load_tokenizer(src), eval_texts(), 512, args.eval_windows)
    base = nll(src, windows, TEST_WINDOWS)
    print(f"unquantized: perplexity {math.exp(base[0]):.2f} on {TEST_WINDOWS} windows, "
          f"{math.exp(base[1]):.2f} on {windows.shape[0]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            t0 = time.time()
            samples = args.calib_samples or CALIB_SAMPLES.get(method, 8)
            path = quantize_checkpoint(src, Path(tmp) / method, method, calib_samples=samples,
                                       group_size=args.group_size, progress=False)
            head, full = nll(path, windows, TEST_WINDOWS)
            group = args.group_size or default_group_size(src)
            print(f"{method:10s} g{group} {100 * (math.exp(head - base[0]) - 1):+6.1f}% "
                  f"on {TEST_WINDOWS} windows "
                  f"{100 * (math.exp(full - base[1]) - 1):+6.1f}% on {windows.shape[0]}  "
                  f"(calibration {samples} windows, {time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
