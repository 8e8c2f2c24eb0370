"""Quantize a checkpoint offline into a new safetensors checkpoint that the engine loads as it is.

    python -m tools.quantize --model SRC --quant int4_awq --output DST

SRC: an HF checkpoint directory, a .gguf file, or nothing for the bundled SmolLM2. Methods (TensorRT-LLM's
--qformat names where one exists): int8_wo, int4_wo (round-to-nearest), int4_awq, int4_gptq (calibrated on
text; the bundled Lee corpus unless --calib-file; GPTQ runs on the model with its residual stream rotated, which
stores a tied LM head on its own), fp8 and int8_sq (W8A8). The repo generator calls
backend.engine.quantization.quantize_checkpoint, as this does.
"""
from __future__ import annotations

import argparse
import sys
import time

from backend.engine.quantization import CALIBRATED, METHODS, quantize_checkpoint
from backend.engine.quantization.api import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN, DEFAULT_SMOOTHQUANT_ALPHA


# quantize_checkpoint's parameter names (InvalidParameterError.field) -> this tool's flags
FLAGS = {"group_size": "--group-size", "calib_samples": "--calib-samples", "calib_seq_len": "--calib-seq-len",
         "smoothquant_alpha": "--smoothquant-alpha", "device": "--device", "calib_file": "--calib-file",
         "quant": "--quant", "dtype": "--dtype"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF checkpoint dir or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--quant", required=True, choices=sorted(METHODS), help="quantization method")
    p.add_argument("--output", required=True, help="directory to write the quantized checkpoint to")
    p.add_argument("--group-size", type=int, default=None,
                   help="INT4 group size (default 128, or 32 when the source is a GGUF quantized in blocks of 32)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the tensors left unquantized (default: as in the source)")
    p.add_argument("--calib-file", help="calibration text (paragraphs separated by blank lines)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                   help="calibration windows (default %(default)s)")
    p.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN,
                   help="tokens per calibration window (default %(default)s)")
    p.add_argument("--smoothquant-alpha", type=float, default=DEFAULT_SMOOTHQUANT_ALPHA,
                   help="int8_sq migration strength (default %(default)s)")
    p.add_argument("--device", default="cpu", help="where calibration runs: cpu or cuda")
    p.add_argument("--quant-lm-head", action="store_true",
                   help="quantize the LM head too (8-bit: the method's format, INT8 weight-only under INT4 methods)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --output")
    p.add_argument("--eval", action="store_true", help="print perplexity of source and result on held-out text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    from backend.engine.checkpoint import resolve_checkpoint
    from backend.engine.errors import InvalidParameterError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        src = resolve_checkpoint(args.model or None)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"argument --model: {exc}")
    start = time.perf_counter()
    try:  # bad values are reported as the flag that set them, before any work is done
        out = quantize(args, src)
    except InvalidParameterError as exc:
        parser.error(f"argument {FLAGS.get(exc.field, exc.field)}: {exc.reason}")
    except FileExistsError:
        parser.error(f"argument --output: {args.output} already holds a checkpoint (--overwrite replaces it)")
    from backend.engine.quantization import QuantConfig

    print(f"wrote {QuantConfig.from_dir(out).describe()} checkpoint {out} in {time.perf_counter() - start:.1f} s "
          f"(from {src})")
    if args.eval:
        report_perplexity(src, out, args.device)
    return 0


def quantize(args: argparse.Namespace, src):
    texts = None
    if args.calib_file and args.quant not in CALIBRATED:
        print(f"warning: --calib-file is not used: {args.quant} is not calibrated", file=sys.stderr)
    elif args.calib_file:
        from backend.engine.quantization.calibration import texts_from_file

        texts = texts_from_file(args.calib_file)
    return quantize_checkpoint(src, args.output, args.quant, group_size=args.group_size, dtype=args.dtype,
                               calib_texts=texts, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                               smoothquant_alpha=args.smoothquant_alpha, device=args.device,
                               quantize_lm_head=args.quant_lm_head, progress=not args.quiet,
                               overwrite=args.overwrite)


def report_perplexity(src, out, device: str) -> None:
    from backend.engine.checkpoint import load_tokenizer
    from backend.engine.quantization.calibration import eval_texts, token_windows
    from backend.engine.quantization.perplexity import checkpoint_perplexity

    windows = token_windows(load_tokenizer(src), eval_texts(), 512)
    base, quant = checkpoint_perplexity(src, windows, device), checkpoint_perplexity(out, windows, device)
    print(f"perplexity on {windows.numel()} held-out tokens: source {base:.3f}, quantized {quant:.3f} "
          f"({100 * (quant / base - 1):+.2f}%)")


if __name__ == "__main__":
    sys.exit(main())
