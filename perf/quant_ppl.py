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

    python perf/quant_ppl.py --methods fp8 int8_wo --kl      # also the KL divergence from the unquantized model

--kl adds the mean per-token KL(unquantized || quantized) of the next-token distributions on the same windows. The
perplexity change of near-equivalent quantizations moves by +-0.5 points on 4 windows (session 22's FP8 study:
turning one projection's activation quantization off made it better or worse by that much at random), while the KL
moves with the size of the error, so A/B decisions between variants read better from it; the targets stay
perplexity.
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

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.engine.checkpoint import load_model, load_tokenizer, resolve_checkpoint  # noqa: E402
from backend.engine.ops import select_ops  # noqa: E402
from backend.engine.quantization import METHODS, QuantConfig, quantize_checkpoint  # noqa: E402
from backend.engine.quantization.api import default_group_size  # noqa: E402
from backend.engine.quantization.calibration import eval_texts, token_windows  # noqa: E402
from backend.engine.quantization.forward import window_logits  # noqa: E402
from backend.engine.quantization.perplexity import perplexity  # noqa: E402

TEST_WINDOWS = 4
CALIB_SAMPLES = {"int4_gptq": 16, "fp8": 16, "int4_awq": 16}  # as tests/test_quant_ppl.py


def nll(path: Path, windows, first: int) -> tuple[float, float]:
    """Mean next-token NLL on the first `first` windows and on all of them."""
    model = load_cpu(path)
    head = math.log(perplexity(model, windows[:first]))
    rest = math.log(perplexity(model, windows[first:])) if windows.shape[0] > first else head
    n = windows.shape[0]
    return head, (first * head + (n - first) * rest) / n


def load_cpu(path: Path):
    return load_model(path, select_ops("auto", "cpu"), "auto", "cpu")[0]


@torch.inference_mode()
def mean_kl(reference, model, windows, first: int, batch_size: int = 4) -> tuple[float, float]:
    """Mean per-token KL(reference || model) of the next-token distributions on the first `first` windows and on
    all of them (first divisible by batch_size)."""
    sums = []
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start:start + batch_size]
        p_log = F.log_softmax(window_logits(reference, chunk)[:, :-1].float(), dim=-1)
        q_log = F.log_softmax(window_logits(model, chunk)[:, :-1].float(), dim=-1)
        sums.append(float((p_log.exp() * (p_log - q_log)).sum()) / (chunk.shape[0] * (chunk.shape[1] - 1)))
    head = sum(sums[:first // batch_size]) / (first // batch_size)
    return head, sum(sums) / len(sums)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["int4_wo", "int4_gptq", "int4_awq"])
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=None, help="for every calibrated method (default: the test's)")
    p.add_argument("--group-size", type=int, default=None,
                   help="INT4 group size (default: the library's choice for the source, 32 for the bundled Q4_1 model)")
    p.add_argument("--kl", action="store_true", help="also the mean KL divergence from the unquantized model")
    p.add_argument("--lm-head", nargs="+", choices=["none", "8bit", "4bit"], default=["none"],
                   help="the LM head unquantized, in the method's 8-bit head format, or in INT4 groups")
    args = p.parse_args()
    if "4bit" in args.lm_head and any(METHODS[m][0] != "w4a16" for m in args.methods):
        p.error("--lm-head 4bit: only with INT4 methods (the head takes their groups)")
    src = resolve_checkpoint(None)
    windows = token_windows(load_tokenizer(src), eval_texts(), 512, args.eval_windows)
    base = nll(src, windows, TEST_WINDOWS)
    reference = load_cpu(src) if args.kl else None
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
                    kl = mean_kl(reference, load_cpu(path), windows, TEST_WINDOWS) if args.kl else None
                group = args.group_size or default_group_size(src)
                print(f"{method:10s} g{group} head {lm_head:4s} {100 * (math.exp(first - base[0]) - 1):+6.1f}% "
                      f"on {TEST_WINDOWS} windows "
                      f"{100 * (math.exp(full - base[1]) - 1):+6.1f}% on {windows.shape[0]}  "
                      + (f"KL {kl[0]:.5f} / {kl[1]:.5f}  " if kl else "")
                      + f"(calibration {samples} windows, {time.time() - t0:.0f} s)", flush=True)


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
