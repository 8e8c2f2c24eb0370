"""Perplexity change of quantization methods on the bundled SmolLM2-135M over more held-out windows than
tests/test_quant_ppl.py can afford (its 4-window figure moves by a few points between near-equivalent roundings).

    python perf/quant_ppl.py --methods int4_wo int4_gptq int4_awq --eval-windows 20     # CPU, minutes per method

Each method is quantized through quantize_checkpoint (same calibration split and sample counts as the test) and
evaluated on the first --eval-windows windows of 512 tokens of the held-out split; the test's 4 windows are the
first 4, so the line prints both figures against the unquantized model of the same run.

    python perf/quant_ppl.py --methods int4_wo int4_awq --lm-head none 8bit 4bit    # the LM head's share

--lm-head: the head left in the model dtype (none), quantized in the method's head format (8bit: INT8 weight-only
under the 4-bit methods, what --quant-lm-head gives), or in INT4 groups like the projections (4bit: not offered by
the tools, measured here to show why).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.checkpoint import load_model, load_tokenizer, resolve_checkpoint  # noqa: E402
from backend.engine.ops import select_ops  # noqa: E402
from backend.engine.quantization import METHODS, QuantConfig, quantize_checkpoint  # noqa: E402
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
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["int4_wo", "int4_gptq", "int4_awq"])
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=None, help="for every calibrated method (default: the test's)")
    p.add_argument("--group-size", type=int, default=None,
                   help="INT4 group size (default: the library's choice for the source, 32 for the bundled Q4_1 model)")
    p.add_argument("--lm-head", nargs="+", choices=["none", "8bit", "4bit"], default=["none"],
                   help="the LM head unquantized, in the method's 8-bit head format, or in INT4 groups")
    args = p.parse_args()
    if "4bit" in args.lm_head and any(METHODS[m][0] != "w4a16" for m in args.methods):
        p.error("--lm-head 4bit: only with INT4 methods (the head takes their groups)")
    src = resolve_checkpoint(None)
    windows = token_windows(load_tokenizer(src), eval_texts(), 512, args.eval_windows)
    base = nll(src, windows, TEST_WINDOWS)
    print(f"unquantized: perplexity {math.exp(base[0]):.2f} on {TEST_WINDOWS} windows, "
          f"{math.exp(base[1]):.2f} on {windows.shape[0]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for lm_head in args.lm_head:
                t0 = time.time()
                samples = args.calib_samples or CALIB_SAMPLES.get(method, 8)
                with head_format(lm_head):  # the loader reads it too
                    path = quantize_checkpoint(src, Path(tmp) / f"{method}-{lm_head}", method, calib_samples=samples,
                                               group_size=args.group_size, quantize_lm_head=lm_head != "none",
                                               progress=False)
                    first, full = nll(path, windows, TEST_WINDOWS)
                group = args.group_size or default_group_size(src)
                print(f"{method:10s} g{group} head {lm_head:4s} {100 * (math.exp(first - base[0]) - 1):+6.1f}% "
                      f"on {TEST_WINDOWS} windows "
                      f"{100 * (math.exp(full - base[1]) - 1):+6.1f}% on {windows.shape[0]}  "
                      f"(calibration {samples} windows, {time.time() - t0:.0f} s)", flush=True)


@contextlib.contextmanager
def head_format(lm_head: str):
    """4bit: QuantConfig.head_format answers w4a16 (the projections' INT4 format) while quantizing and loading."""
    original = QuantConfig.head_format
    if lm_head == "4bit":
        QuantConfig.head_format = property(lambda self: "w4a16")
    try:
        yield
    finally:
        QuantConfig.head_format = original


if __name__ == "__main__":
    main()
