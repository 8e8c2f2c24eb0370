"""Write a self-contained Triton model repository for a checkpoint (by default the bundled SmolLM2).

    python -m tools.generate_repo --output-dir model_repo
    python -m tools.generate_repo --output-dir repo --model /path/to/hf_dir_or.gguf --max-batch-size 32 \\
        --max-seq-len 4096 --kv-cache-mb 2048 --instances 1 --apply-chat-template

The repository holds `ensemble` (the TensorRT-LLM backend's interface), `preprocessing`, the engine model
(`llm`, backend "tritium") with the checkpoint copied under `llm/1/checkpoint/` (safetensors only),
`postprocessing`, and `vllm_model` (the vLLM backend's interface, forwarding to the engine model). Templates in
model_repo_templates/ use ${name} variables: a missing or unknown variable, or an invalid option, is an error
here, naming it, not at server start.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from backend.engine.config import ATTENTION_BACKENDS, DEVICES, DTYPES, EngineConfig
from backend.engine.errors import EngineError, InvalidParameterError
from backend.engine.parallel.placement import format_groups
from backend.engine.quantization.config import METHODS as QUANT_METHODS
from backend.serving.engine_settings import DEFAULT_RESPONDER_THREADS, to_parameters

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "model_repo_templates"
TEMPLATE_MODELS = ("ensemble", "preprocessing", "llm", "postprocessing", "vllm_model")
CHECKPOINT_SUBDIR = "1/checkpoint"  # relative to the engine model's directory
TOKENIZER_SUBDIR = "1/tokenizer"  # relative to preprocessing's directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
# source_quantization.json: a converted GGUF's block size, so quantizing the repo's checkpoint later still
# defaults to groups that follow it (backend/engine/quantization/api.py default_group_size)
CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "source_quantization.json")
VARIABLE = re.compile(r"\$\{(\w+)\}")

# Friendly option names (TensorRT-LLM style) for engine fields; every other field gets --its-name.
ALIASES = {
    "max_num_seqs": ["--max-batch-size"],
    "max_model_len": ["--max-seq-len"],
    "kv_cache_memory_mb": ["--kv-cache-mb"],
    "tensor_parallel_size": ["--tp"],
}
CHOICES = {"dtype": DTYPES, "device": DEVICES, "attention_backend": ATTENTION_BACKENDS}
INSTANCE_KINDS = {"model": "KIND_MODEL", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}


class TemplateError(ValueError):
    pass


# ---- templates ----------------------------------------------------------------------------------------------

def fill_template(text: str, values: dict[str, str], where: str, used: set[str] | None = None) -> str:
    """Replaces every ${name}; a name without a value is an error naming the template."""
    missing = sorted({m for m in VARIABLE.findall(text) if m not in values})
    if missing:
        raise TemplateError(f"{where}: no value for template variable(s) {', '.join(missing)}")
    if used is not None:
        used.update(VARIABLE.findall(text))
    return VARIABLE.sub(lambda m: str(values[m.group(1)]), text)


def render_configs(values: dict[str, str], templates: Path = TEMPLATES) -> dict[str, str]:
    """{model template dir: config text}; a value no template uses is an error too (a misspelt key)."""
    used: set[str] = set()
    configs = {name: fill_template((templates / name / "config.pbtxt").read_text(), values,
                                   f"{name}/config.pbtxt", used) for name in TEMPLATE_MODELS}
    unknown = sorted(set(values) - used)
    if unknown:
        raise TemplateError(f"unknown template variable(s) {', '.join(unknown)}: no template uses them")
    return configs


def check_config_syntax(name: str, text: str) -> None:
    """Parses the config with Triton's own protobuf schema when tritonclient is installed."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TemplateError(f"{name}/config.pbtxt is not a valid model config: {exc}") from None


def engine_parameters_block(config: EngineConfig) -> str:
    entries = [f'  {{\n    key: "{k}"\n    value: {{ string_value: "{v}" }}\n  }}' for k, v in to_parameters(config).items()]
    return ",\n".join(entries)


def template_values(args: argparse.Namespace, config: EngineConfig) -> dict[str, str]:
    """With --gpus, Triton starts `count` instances on each listed GPU: list each instance's first GPU once
    (count 1); the instance finds the rest of its tensor-parallel group in instance_gpu_groups."""
    tp = config.tensor_parallel_size
    leads = args.gpus[::tp] if args.gpus else []
    gpus = f"\n    gpus: [ {', '.join(str(g) for g in leads)} ]" if leads else ""
    return {
        "max_batch_size": str(config.max_num_seqs),
        "engine_model": args.engine_model_name,
        "instance_count": "1" if leads else str(args.instances),
        "instance_kind": INSTANCE_KINDS[args.instance_kind],
        "instance_gpus": gpus,
        "instance_gpu_groups": format_groups(args.gpus, tp) if args.gpus else "",
        "engine_parameters": engine_parameters_block(config),
        "tokenizer_dir": TOKENIZER_SUBDIR,
        "apply_chat_template": "true" if args.apply_chat_template else "false",
        "responder_threads": str(args.responder_threads),
        "engine_process": "true" if args.engine_process else "false",
        "preprocessing_instances": str(args.preprocessing_instances),
        "postprocessing_instances": str(args.postprocessing_instances),
    }


# ---- files --------------------------------------------------------------------------------------------------

def checkpoint_files(checkpoint: Path, with_weights: bool = True) -> tuple[list[Path], list[Path]]:
    """(weights, small files) to copy; pickle weights are refused by safetensors_files. Without weights
    (load_format dummy, for benchmarks of real shapes) a config.json and the tokenizer are enough."""
    from backend.engine.checkpoint import safetensors_files

    weights = safetensors_files(checkpoint) if with_weights else []
    small = [checkpoint / n for n in CONFIG_FILES + TOKENIZER_FILES if (checkpoint / n).is_file()]
    return weights, small


def copy_with_progress(files: list[Path], dest: Path, progress: bool = True, link: bool = True) -> None:
    from tqdm.auto import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="copying weights", disable=not progress) as bar:
        for f in files:
            target = dest / f.name
            target.unlink(missing_ok=True)
            if link and _try_link(f, target):
                bar.update(f.stat().st_size)
                continue
            with open(f, "rb") as src, open(target, "wb") as dst:
                while chunk := src.read(16 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))


def _is_cached(checkpoint: Path) -> bool:
    """Only our own GGUF conversions are linked: a user's checkpoint may later be rewritten in place."""
    from backend.engine.checkpoint import default_cache_dir

    return default_cache_dir().resolve() in checkpoint.resolve().parents


def _try_link(src: Path, dst: Path) -> bool:
    """A hard link is a full copy for every reader (conversions are never rewritten in place) at no cost."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        return False


def write_repo(args: argparse.Namespace, config: EngineConfig, configs: dict[str, str], checkpoint: Path,
               link_weights: bool | None = None) -> Path:
    out = Path(args.output_dir)
    names = {m: (args.engine_model_name if m == "llm" else m) for m in TEMPLATE_MODELS}
    for model in TEMPLATE_MODELS:
        target = out / names[model]
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(TEMPLATES / model, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (target / "config.pbtxt").write_text(configs[model])
        (target / "1").mkdir(exist_ok=True)
    weights, small = checkpoint_files(checkpoint, with_weights=config.load_format != "dummy")
    engine_dir = out / names["llm"] / CHECKPOINT_SUBDIR
    link = link_weights if link_weights is not None else not args.copy and _is_cached(checkpoint)
    copy_with_progress(weights, engine_dir, progress=not args.quiet, link=link)
    for f in small:
        shutil.copy2(f, engine_dir / f.name)
    tokenizer_dir = out / "preprocessing" / TOKENIZER_SUBDIR
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for f in small:
        if f.name in TOKENIZER_FILES:
            shutil.copy2(f, tokenizer_dir / f.name)
    return out


# ---- command line -------------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.generate_repo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="where to write the model repository")
    parser.add_argument("--model", default="", help="HF checkpoint dir or .gguf file (default: bundled SmolLM2)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    parser.add_argument("--engine-model-name", default="llm", help="name of the engine model (default: llm)")
    parser.add_argument("--instances", type=int, default=1, help="engine instances (each loads the model)")
    parser.add_argument("--instance-kind", choices=sorted(INSTANCE_KINDS), default="model",
                        help="model: the engine picks its device (GPU if any); gpu: instances on GPUs (implied "
                             "by --gpus and by --tp > 1 on GPU)")
    parser.add_argument("--gpus", type=_int_list, default=None,
                        help="GPU ids, --instances x --tp of them: instance i gets gpus[i*tp:(i+1)*tp], e.g. "
                             "--instances 2 --tp 2 --gpus 0,1,2,3 (default with --tp > 1: 0..instances*tp-1)")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="apply the tokenizer's chat template to every prompt by default (a request "
                             "parameter apply_chat_template overrides it)")
    parser.add_argument("--responder-threads", type=_positive_int, default=DEFAULT_RESPONDER_THREADS,
                        help="threads per engine instance that stream responses to tritonserver (default: "
                             f"{DEFAULT_RESPONDER_THREADS}); their sends overlap, see backend/serving/responder.py")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run each instance's engine step loop in its own process (default; see "
                             "backend/engine/engine_process.py); --no-engine-process keeps it in the Python stub")
    parser.add_argument("--preprocessing-instances", type=int, default=1)
    parser.add_argument("--postprocessing-instances", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--copy", action="store_true",
                        help="always copy the weights (default: hard-link converted GGUF weights from the cache)")
    quant = parser.add_argument_group("quantization (the repo gets a quantized checkpoint; see tools/quantize.py)")
    quant.add_argument("--quant", choices=sorted(QUANT_METHODS), default=None,
                       help="int8_wo, int4_wo, int4_awq, int4_gptq, fp8 or int8_sq (default: none)")
    quant.add_argument("--quant-group-size", type=int, default=None,
                       help="INT4 group size (default 128, or 32 when the source is a GGUF quantized in blocks of "
                            "32, like the bundled Q4_1 SmolLM2)")
    quant.add_argument("--calib-file", default=None,
                       help="calibration text for int4_awq/int4_gptq/int8_sq/fp8 (default: the bundled corpus)")
    quant.add_argument("--quant-device", default="cpu", choices=["cpu", "cuda"], help="where calibration runs")
    quant.add_argument("--quant-lm-head", action="store_true",
                       help="quantize the LM head too (8-bit: the method's format, INT8 weight-only under INT4 "
                            "methods); default: it stays in the model dtype")
    engine = parser.add_argument_group("engine settings (backend/engine/config.py)")
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        _add_engine_option(engine, f)
    return parser


def _add_engine_option(group, f: dataclasses.Field) -> None:
    flags = ALIASES.get(f.name, []) + [_flag(f.name)]
    kind = str(f.type).replace(" ", "").split("|")[0]
    help_text = f"default: {f.default}"
    if kind == "bool":
        group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    convert = {"int": int, "float": float}.get(kind, str)
    group.add_argument(*flags, dest=f.name, type=convert, default=None, choices=CHOICES.get(f.name),
                       help=help_text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def engine_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
              if f.name != "model" and getattr(args, f.name) is not None}
    try:
        return EngineConfig(model=CHECKPOINT_SUBDIR, **values)
    except InvalidParameterError as exc:
        flags = "/".join(ALIASES.get(exc.field, []) + [_flag(exc.field)])
        parser.error(f"argument {flags}: {exc.reason}")


def check_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("instances", "preprocessing_instances", "postprocessing_instances"):
        if getattr(args, name) < 1:
            parser.error(f"argument {_flag(name)}: must be a positive integer, got {getattr(args, name)}")
    others = set(TEMPLATE_MODELS) - {"llm"}
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.engine_model_name) or args.engine_model_name in others:
        parser.error(f"argument --engine-model-name: invalid model name {args.engine_model_name!r}")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --output-dir: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        parser.error(f"argument --output-dir: {out} is not empty (use --force to overwrite)")
    if args.quant_lm_head and not args.quant:
        parser.error("argument --quant-lm-head: needs --quant (the method whose format the head takes)")
    if args.quant and args.load_format == "dummy":
        parser.error("argument --quant: needs real weights; with --load-format dummy put a quantization_config "
                     "in the checkpoint's config.json instead (the engine quantizes its random weights)")
    if args.quant:
        check_quant_options(args, parser)


# quantize_checkpoint's parameter names (InvalidParameterError.field) -> this tool's flags
QUANT_FLAGS = {"group_size": "--quant-group-size", "device": "--quant-device", "calib_file": "--calib-file"}


def check_quant_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The quantization flags checked before anything is written (the quantizer checks them again); the
    calibration text is read here, once (args.calib_texts)."""
    from backend.engine.quantization import CALIBRATED, QuantConfig
    from backend.engine.quantization.api import check_calibration_options
    from backend.engine.quantization.calibration import texts_from_file

    if args.calib_file and args.quant not in CALIBRATED:
        print(f"warning: --calib-file is not used: {args.quant} is not calibrated", file=sys.stderr)
    args.calib_texts = None
    try:
        if args.quant_group_size is not None:
            QuantConfig.for_method(args.quant, args.quant_group_size)
        # this tool keeps the quantizer's calibration defaults: only the device is the user's
        check_calibration_options(args.quant, device=args.quant_device)
        if args.calib_file and args.quant in CALIBRATED:
            args.calib_texts = texts_from_file(args.calib_file)
    except InvalidParameterError as exc:
        parser.error(f"argument {QUANT_FLAGS.get(exc.field, exc.field)}: {exc.reason}")


def place_instances(args: argparse.Namespace, config: EngineConfig, parser: argparse.ArgumentParser) -> None:
    """Decide the instance kind and GPU list for --instances/--tp/--gpus; a bad combination names the option."""
    tp = config.tensor_parallel_size
    if args.gpus is not None and (args.instance_kind == "cpu" or config.device == "cpu"):
        parser.error("argument --gpus: only with --instance-kind gpu (not with --instance-kind cpu or --device cpu)")
    if config.device == "cpu":
        return  # tensor parallelism on CPU (gloo) runs inside one instance of kind model/cpu
    if args.gpus is None and tp > 1:
        args.gpus = list(range(args.instances * tp))
    if args.gpus is None:
        return
    args.instance_kind = "gpu"
    if len(set(args.gpus)) != len(args.gpus):
        parser.error(f"argument --gpus: GPU ids must be distinct, got {args.gpus}")
    if len(args.gpus) != args.instances * tp:
        parser.error(f"argument --gpus: lists {len(args.gpus)} GPUs, but --instances {args.instances} x --tp {tp} "
                     f"needs {args.instances * tp}")
    available = visible_gpu_count()
    if available is None:
        print("warning: no GPU visible here; --gpus is not checked against the serving machine", file=sys.stderr)
    elif max(args.gpus) >= available:
        parser.error(f"argument --gpus: GPU {max(args.gpus)} does not exist ({available} visible: 0..{available - 1})")


def visible_gpu_count() -> int | None:
    """GPUs this machine has, or None (no GPU, or a CPU-only torch): then --gpus cannot be checked here."""
    try:
        import torch
    except ImportError:
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return count or None


def check_tensor_parallel(checkpoint: Path, config: EngineConfig, parser: argparse.ArgumentParser) -> None:
    """Whole heads and equal MLP slices per rank, checked against the checkpoint's config.json now."""
    from backend.engine.model_config import ModelConfig
    from backend.engine.parallel.sharding import check_divisible

    try:
        check_divisible(ModelConfig.from_dir(checkpoint), config.tensor_parallel_size)
    except InvalidParameterError as exc:
        parser.error(f"argument --tp/--tensor-parallel-size: {exc.reason}")


def write_quantized_repo(args: argparse.Namespace, config: EngineConfig, configs: dict[str, str],
                         checkpoint: Path) -> Path:
    """Quantizes into a scratch folder inside the output directory (same filesystem: the weights are then
    hard-linked into llm/1/checkpoint, not copied again) and removes it."""
    from backend.engine.quantization import quantize_checkpoint

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".quantizing-") as scratch:
        quantized = quantize_checkpoint(checkpoint, Path(scratch) / "checkpoint", args.quant,
                                        group_size=args.quant_group_size, calib_texts=args.calib_texts,
                                        device=args.quant_device, quantize_lm_head=args.quant_lm_head,
                                        progress=not args.quiet)
        return write_repo(args, config, configs, quantized, link_weights=not args.copy)


def describe_quantization(args: argparse.Namespace) -> str:
    from backend.engine.quantization import QuantConfig

    return QuantConfig.from_dir(Path(args.output_dir) / args.engine_model_name / CHECKPOINT_SUBDIR).describe()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(args, parser)
    config = engine_config(args, parser)
    place_instances(args, config, parser)
    try:
        configs = render_configs(template_values(args, config))
        for name, text in configs.items():
            check_config_syntax(name, text)
        from backend.engine.checkpoint import resolve_checkpoint
        checkpoint = resolve_checkpoint(args.model or None)
        check_tensor_parallel(checkpoint, config, parser)
        if args.quant:
            out = write_quantized_repo(args, config, configs, checkpoint)
        else:
            out = write_repo(args, config, configs, checkpoint)
    except (TemplateError, EngineError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    quantized = f", quantized {describe_quantization(args)}" if args.quant else ""
    print(f"wrote model repository {out} (checkpoint {checkpoint}{quantized})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
