"""Run perf_analyzer (or genai-perf) against the `ensemble` as against TensorRT-LLM's, and report LLM metrics.

    .venv/bin/python -m perf.perf_analyzer --url localhost:8001 --concurrency 1,4,16 --max-tokens 64
    .venv/bin/python -m perf.perf_analyzer --tool genai-perf --url localhost:8001 --concurrency 4 \\
        --tokenizer <checkpoint dir with tokenizer.json>
    .venv/bin/python -m perf.perf_analyzer --interface vllm --concurrency 4   # vllm_model, as genai-perf --backend vllm
    .venv/bin/python -m perf.perf_analyzer --setup-only          # fetch perf_analyzer and print where it is

perf_analyzer streams over gRPC (`--streaming`, decoupled model) with the inputs TensorRT-LLM's backend takes
and genai-perf `--service-kind triton --backend tensorrtllm` sends: text_input, max_tokens, stream=true,
exclude_input_in_output=true, plus min_length (the old name of min_tokens, as those clients send it for
fixed-length outputs) and return_num_output_tokens. From its --profile-export-file (per-request send and
response timestamps, response outputs) we compute what genai-perf reports: time to first token,
inter-token latency, request latency percentiles, output tokens/s and requests/s. `--interface vllm` sends
vllm_model what genai-perf `--backend vllm` sends instead: text_input, stream, exclude_input_in_output and
sampling_parameters {"max_tokens": "N", "min_tokens": "N"} (string values, as genai-perf writes them).

Finding perf_analyzer: $PERF_ANALYZER, `perf_analyzer` on PATH (the GPU bundle's .device/unpack.sh puts it
there), $TRITONSERVER_ROOT/bin, else a cache (~/.cache/tritium/perf_analyzer) filled on first use from the
tritonclient==2.51.0 wheel (PyPI). Its libraries libb64.so.0d and libcudart.so.12 are linked into the cache
from the nvidia-pytriton wheel's nvidia_pytriton.libs (no apt, no CUDA toolkit needed; it runs on CPU).
genai-perf (PyPI genai-perf==0.0.16) pulls numpy 2, which breaks tritonserver 2.51's Python stub, so it is
installed into its own virtualenv in the cache, never into .venv.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("TRITIUM_CACHE", Path.home() / ".cache" / "tritium"))
PA_WHEEL = "tritonclient==2.51.0"
GENAI_PERF = "genai-perf==0.0.16"
DEFAULT_PROMPTS = ("What is machine learning?", "Write a haiku about the sea.", "Name three uses of copper.",
                   "Explain how a bicycle stays upright.", "Give me a recipe for pancakes.",
                   "Why is the sky blue?", "Summarize the plot of Hamlet.", "What does a compiler do?")


# ---- finding / setting up perf_analyzer ----

def find_perf_analyzer(cache: Path = CACHE, setup: bool = True) -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary and the environment to run it in; sets it up in the cache when missing."""
    for candidate in _candidates(cache):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate, _environment(cache)
    if not setup:
        raise FileNotFoundError("perf_analyzer not found (set PERF_ANALYZER or run with --setup-only)")
    return setup_perf_analyzer(cache), _environment(cache)


def _candidates(cache: Path) -> list[Path]:
    found = [os.environ.get("PERF_ANALYZER"), shutil.which("perf_analyzer")]
    if os.environ.get("TRITONSERVER_ROOT"):
        found.append(str(Path(os.environ["TRITONSERVER_ROOT"]) / "bin" / "perf_analyzer"))
    return [Path(p) for p in found if p] + [cache / "perf_analyzer" / "bin" / "perf_analyzer"]


def setup_perf_analyzer(cache: Path = CACHE) -> Path:
    """bin/perf_analyzer from the tritonclient 2.51.0 manylinux wheel, and its two missing libraries."""
    root = cache / "perf_analyzer"
    binary = root / "bin" / "perf_analyzer"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux1_x86_64", "-d", tmp, PA_WHEEL], check=True)
        wheel = next(Path(tmp).glob("tritonclient-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith("/bin/perf_analyzer"))
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_bytes(zf.read(member))
    binary.chmod(0o755)
    link_libraries(root / "lib")
    return binary


def link_libraries(lib_dir: Path) -> None:
    """libb64.so.0d and libcudart.so.12 under the names perf_analyzer asks for, from nvidia_pytriton.libs."""
    libs = _pytriton_libs()
    lib_dir.mkdir(parents=True, exist_ok=True)
    for wanted, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        source = next(iter(sorted(libs.glob(pattern))), None) if libs else None
        if source is None:
            raise FileNotFoundError(f"{wanted}: not in nvidia_pytriton.libs (pip install nvidia-pytriton==0.7.0)")
        target = lib_dir / wanted
        target.unlink(missing_ok=True)
        target.symlink_to(source)


def _pytriton_libs() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(list(spec.submodule_search_locations)[0]).parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


def _environment(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    extra = [str(p) for p in (cache / "perf_analyzer" / "lib", _pytriton_libs()) if p and Path(p).is_dir()]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(extra + [env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH")
                                             else extra)
    if not (cache / "perf_analyzer" / "lib" / "libb64.so.0d").exists() and _pytriton_libs():
        link_libraries(cache / "perf_analyzer" / "lib")  # a binary found elsewhere still needs the names
    return env


# ---- perf_analyzer ----

INTERFACES = ("trtllm", "vllm")  # the ensemble's inputs, or vllm_model's (README: clients of the vLLM backend)


def input_data(prompts: list[str], max_tokens: int, fixed_length: bool = True, interface: str = "trtllm") -> dict:
    """perf_analyzer --input-data: one entry per prompt (dims without batch), with the TensorRT-LLM backend's inputs
    or, for interface "vllm", those genai-perf --backend vllm sends (sampling_parameters with string values)."""
    def entry(prompt: str) -> dict:
        values = {"text_input": [prompt], "stream": [True], "exclude_input_in_output": [True],
                  "return_num_output_tokens": [True]}
        if interface == "vllm":
            sampling = {"max_tokens": str(max_tokens), **({"min_tokens": str(max_tokens)} if fixed_length else {})}
            return {**values, "sampling_parameters": [json.dumps(sampling)]}
        values["max_tokens"] = [max_tokens]
        if fixed_length:
            values["min_length"] = [max_tokens]
        return values
    return {"data": [entry(p) for p in prompts]}


def perf_analyzer_command(binary: Path, url: str, model: str, data_file: Path, concurrency: int, export: Path,
                          requests_per_window: int) -> list[str]:
    # Stability at 999%: accept the first three windows. LLM latencies vary by design under load, and the
    # default 10% could keep a slow CPU run measuring for minutes.
    return [str(binary), "-m", model, "-u", url, "-i", "grpc", "--streaming", "--input-data", str(data_file),
            "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
            "--measurement-request-count", str(requests_per_window), "--stability-percentage", "999",
            "--max-trials", "3", "--profile-export-file", str(export)]


def run_perf_analyzer(url: str, model: str, concurrency: int, prompts: list[str], max_tokens: int,
                      requests_per_window: int, workdir: Path, fixed_length: bool = True,
                      timeout: float = 600, interface: str = "trtllm") -> dict:
    """One concurrency level: perf_analyzer's exit code and output, plus the LLM metrics of its export."""
    binary, env = find_perf_analyzer()
    workdir.mkdir(parents=True, exist_ok=True)
    data_file, export = workdir / "input_data.json", workdir / f"profile_c{concurrency}.json"
    data_file.write_text(json.dumps(input_data(prompts, max_tokens, fixed_length, interface)))
    export.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite its export
    command = perf_analyzer_command(binary, url, model, data_file, concurrency, export, requests_per_window)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    result = {"concurrency": concurrency, "returncode": done.returncode, "command": " ".join(command),
              "output": done.stdout + done.stderr}
    if done.returncode == 0 and export.is_file():
        parsed, complete = load_export(export.read_text())
        result.update(llm_metrics(parsed, cumulative_counts=interface == "trtllm"))
        if not complete:
            result["export_note"] = (f"perf_analyzer's export was not valid JSON past some point; the "
                                     f"{result['requests']} requests before it were used")
    return result


BARE_NON_FINITE = re.compile(r"([:\[,]\s*)-?(?:nan|inf|infinity)(?![\w\"])", re.IGNORECASE)


def load_export(text: str) -> tuple[dict, bool]:
    """The profile export, and whether it parsed whole. perf_analyzer (2.51) writes every output the model
    declares, also those a response does not carry, as whatever its buffer held (seen on the GPU machine:
    kv_cache_reused_blocks -1342177136, cum_log_probs 4.9e26): such a float can be a NaN or an infinity, which it
    writes as a bare nan/inf that is not JSON. Those become null; should the text still not parse, the requests
    before the break are kept, in order, which is still a sample of the same steady state."""
    for attempt in (text, BARE_NON_FINITE.sub(r"\1null", text)):
        try:
            return json.loads(attempt), True
        except json.JSONDecodeError:
            pass
    decoder, requests = json.JSONDecoder(), []
    position = text.find("[", text.find('"requests"')) + 1
    while position > 0:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            request, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break
        requests.append(request)
    return {"experiments": [{"requests": requests}]}, False


def llm_metrics(export: dict, cumulative_counts: bool = True) -> dict:
    """genai-perf's LLM metrics from a perf_analyzer profile export (its first experiment). cumulative_counts:
    num_output_tokens counts the whole request so far (the ensemble), else this response's tokens (vLLM's)."""
    requests = export["experiments"][0]["requests"]
    done = [r for r in requests if r.get("response_timestamps")]
    ttft = [(r["response_timestamps"][0] - r["timestamp"]) / 1e9 for r in done]
    latency = [(r["response_timestamps"][-1] - r["timestamp"]) / 1e9 for r in done]
    tokens = [output_tokens(r, cumulative_counts) for r in done]
    itl = [(r["response_timestamps"][-1] - r["response_timestamps"][0]) / 1e9 / (n - 1)
           for r, n in zip(done, tokens) if n > 1]
    span = (max(r["response_timestamps"][-1] for r in done) - min(r["timestamp"] for r in done)) / 1e9 if done else 0
    return {"requests": len(requests), "completed": len(done), "output_tokens": sum(tokens), "duration_s": span,
            "output_tokens_per_s": sum(tokens) / span if span else 0.0,
            "requests_per_s": len(done) / span if span else 0.0,
            "ttft_s": percentiles(ttft), "itl_s": percentiles(itl), "request_latency_s": percentiles(latency),
            "output_tokens_per_request": percentiles([float(n) for n in tokens])}


def output_tokens(request: dict, cumulative: bool = True) -> int:
    """The last response's num_output_tokens (cumulative), or the sum over responses (per response), else the
    number of responses."""
    counts = [output.get("num_output_tokens") for output in request.get("response_outputs") or []]
    counts = [int(c) for c in counts if isinstance(c, (int, float)) and c > 0]
    if counts:
        return counts[-1] if cumulative else sum(counts)
    return len(request["response_timestamps"])


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
            "min": ordered[0], "max": ordered[-1]}


# ---- genai-perf ----

def find_genai_perf(cache: Path = CACHE, setup: bool = True) -> Path:
    """genai-perf on PATH, else its own virtualenv in the cache (made on first use: it needs PyPI)."""
    on_path = shutil.which("genai-perf")
    if on_path:
        return Path(on_path)
    venv = cache / "genai-perf-venv"
    binary = venv / "bin" / "genai-perf"
    if not binary.is_file():
        if not setup:
            raise FileNotFoundError(f"genai-perf not found: pip install {GENAI_PERF} into its own virtualenv")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", GENAI_PERF], check=True)
    return binary


def genai_perf_command(binary: Path, url: str, model: str, concurrency: int, max_tokens: int, tokenizer: str,
                       prompt_tokens: int, num_prompts: int, artifact_dir: Path, request_count: int,
                       interface: str = "trtllm") -> list[str]:
    """genai-perf as a TensorRT-LLM (or vLLM backend) user runs it; --tokenizer takes a local checkpoint directory.
    0.0.16 spells the older `--service-kind triton` as `--endpoint-type kserve` (the older flag is rejected)."""
    backend = "vllm" if interface == "vllm" else "tensorrtllm"
    return [str(binary), "profile", "-m", model, "--endpoint-type", "kserve", "--backend", backend,
            "--streaming", "-u", url, "--concurrency", str(concurrency), "--tokenizer", tokenizer,
            "--synthetic-input-tokens-mean", str(prompt_tokens), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(max_tokens), "--output-tokens-stddev", "0", "--output-tokens-mean-deterministic",
            "--num-dataset-entries", str(num_prompts), "--request-count", str(request_count),
            "--artifact-dir", str(artifact_dir)]


def run_genai_perf(args) -> int:
    binary = find_genai_perf()
    _, env = find_perf_analyzer()  # genai-perf runs perf_analyzer from PATH
    env["PATH"] = os.pathsep.join([str(find_perf_analyzer()[0].parent), env.get("PATH", "")])
    code = 0
    for concurrency in args.concurrency:
        command = genai_perf_command(binary, args.url, args.model, concurrency, args.max_tokens, args.tokenizer,
                                     args.prompt_tokens, len(DEFAULT_PROMPTS), Path(args.workdir) / "genai-perf",
                                     args.requests_per_window * 3, args.interface)
        print("+", " ".join(command), flush=True)
        code = code or subprocess.run(command, env=env).returncode
    return code


# ---- command line ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.perf_analyzer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", choices=("perf_analyzer", "genai-perf"), default="perf_analyzer")
    parser.add_argument("--url", default="localhost:8001", help="tritonserver gRPC address")
    parser.add_argument("--model", default=None, help="default: ensemble, or vllm_model with --interface vllm")
    parser.add_argument("--interface", choices=INTERFACES, default="trtllm",
                        help="the inputs sent: the TensorRT-LLM backend's (ensemble) or the vLLM backend's (vllm_model)")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-fixed-length", action="store_true", help="do not send min_length = max_tokens")
    parser.add_argument("--requests-per-window", type=int, default=8,
                        help="perf_analyzer measures three windows of at least this many requests")
    parser.add_argument("--tokenizer", default=None, help="genai-perf: a local directory with the tokenizer")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="genai-perf: synthetic prompt length")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tritium-perf"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--setup-only", action="store_true", help="find or fetch perf_analyzer, print it, exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model = args.model or ("vllm_model" if args.interface == "vllm" else "ensemble")
    if args.setup_only:
        binary, env = find_perf_analyzer()
        print(f"{binary}\nLD_LIBRARY_PATH={env['LD_LIBRARY_PATH']}")
        return 0
    if args.tool == "genai-perf":
        if not args.tokenizer:
            print("error: --tool genai-perf needs --tokenizer <local tokenizer dir> (no hub access)", file=sys.stderr)
            return 2
        return run_genai_perf(args)
    results = [run_perf_analyzer(args.url, args.model, c, list(DEFAULT_PROMPTS), args.max_tokens,
                                 args.requests_per_window, Path(args.workdir), not args.no_fixed_length,
                                 interface=args.interface)
               for c in args.concurrency]
    for result in results:
        print_summary(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all(r["returncode"] == 0 for r in results) else 1


def print_summary(result: dict) -> None:
    if result["returncode"] != 0:
        print(f"concurrency {result['concurrency']}: perf_analyzer failed ({result['returncode']}):\n"
              f"{result['output'][-3000:]}")
        return
    ttft, itl = result["ttft_s"], result["itl_s"]
    print(f"concurrency {result['concurrency']}: {result['completed']} requests, "
          f"{result['output_tokens_per_s']:.1f} output tok/s, {result['requests_per_s']:.2f} req/s, "
          f"TTFT p50 {ttft.get('p50', 0) * 1e3:.0f} ms p99 {ttft.get('p99', 0) * 1e3:.0f} ms, "
          f"ITL p50 {itl.get('p50', 0) * 1e3:.1f} ms p99 {itl.get('p99', 0) * 1e3:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
