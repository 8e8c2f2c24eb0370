"""A sweep over concurrency through a real tritonserver: JSON results and PNG plots.

    # CPU, bundled SmolLM2, a server started for the sweep:
    .venv/bin/python -m perf.sweep --start-server --concurrency 1,2,4 --max-tokens 32 --label cpu-smollm2
    # against a running server (gRPC :8001, metrics :8002):
    .venv/bin/python -m perf.sweep --url localhost:8001 --metrics-url localhost:8002 --concurrency 1,8,64
    # plots again from a JSON written elsewhere (e.g. on a GPU machine without matplotlib):
    .venv/bin/python -m perf.sweep --plot-only perf/results/h100-sweep.json

Each level is one perf_analyzer run (perf/perf_analyzer.py: gRPC streaming, TensorRT-LLM-style inputs,
fixed-length outputs) of three windows of at least --requests-per-window requests (and at least twice the
concurrency). Per level: output tokens/s, requests/s, time to first token, inter-token latency and request
latency percentiles as the client saw them, plus the server's own TTFT/ITL means from the tritium metrics
(histogram deltas) when --metrics-url is given or the server was started here.
Writes <out-dir>/<label>-sweep.json and, when matplotlib is importable, <label>-throughput.png,
<label>-ttft.png and <label>-itl.png.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import prometheus  # noqa: E402
from perf.perf_analyzer import DEFAULT_PROMPTS, run_perf_analyzer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def prompts(words: int) -> list[str]:
    """The default prompts, padded to about `words` whitespace-separated words (tokens, for a word-level
    tokenizer such as the benchmark checkpoints' synthetic one)."""
    if words <= 0:
        return list(DEFAULT_PROMPTS)
    filler = [f"w{i % 89}" for i in range(words)]
    return [" ".join((p.split() + filler)[:words]) for p in DEFAULT_PROMPTS]


def run_level(args, concurrency: int, prompt_list: list[str]) -> dict:
    before = prometheus.scrape(args.metrics_url) if args.metrics_url else None
    result = run_perf_analyzer(args.url, args.model, concurrency, prompt_list, args.max_tokens,
                               max(args.requests_per_window, 2 * concurrency), Path(args.out_dir) / "work",
                               timeout=args.level_timeout)
    if before is not None:
        after = prometheus.scrape(args.metrics_url)
        result["server_ttft_mean_s"] = prometheus.histogram_mean(before, after, "tritium_time_to_first_token_seconds")
        result["server_itl_mean_s"] = prometheus.histogram_mean(before, after, "tritium_inter_token_latency_seconds")
    if result["returncode"] != 0:
        print(result["output"][-3000:], file=sys.stderr)
    result.pop("output")  # kept small: the JSON goes into the repository
    return result


def describe_run(args) -> dict:
    return {"label": args.label, "device": args.device or default_device(), "date": args.date,
            "commit": git_commit(), "model": args.model, "model_repository": args.model_repository,
            "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
            "command": shlex.join([Path(sys.executable).name, "-m", "perf.sweep"] + sys.argv[1:]), "levels": []}


def default_device() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"


def git_commit() -> str:
    """TRITIUM_COMMIT if set (the GPU machine's copy of the repository may carry a stale .git), else HEAD."""
    if os.environ.get("TRITIUM_COMMIT"):
        return os.environ["TRITIUM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def maybe_server(args):
    """With --start-server: a tritonserver on the repository (generated for the bundled model if missing)."""
    if not args.start_server:
        yield
        return
    from tools.generate_repo import main as generate_repo
    from tools.serve import BENCHMARK_RESTRICTED, TritonServer

    repo = Path(args.model_repository)
    if not (repo / "ensemble" / "config.pbtxt").is_file():
        if generate_repo(["--output-dir", str(repo), "--quiet", "--device", "cpu"]) != 0:
            raise SystemExit(f"could not generate {repo}")
    http, grpc, metrics = args.ports
    # perf_analyzer reads model-config and statistics, restricted by default (docs/SECURITY.md).
    with TritonServer(repo, http, grpc, metrics, restricted=BENCHMARK_RESTRICTED,
                      log_path=Path(args.out_dir) / f"{args.label}-server.log"):
        args.url, args.metrics_url = f"localhost:{grpc}", f"localhost:{metrics}"
        yield


def warm_up(args, prompt_list: list[str]) -> None:
    """One short level first: the first requests pay one-off costs (tokenizer caches, allocator growth)."""
    run_perf_analyzer(args.url, args.model, 1, prompt_list[:2], min(args.max_tokens, 8), 2,
                      Path(args.out_dir) / "work", timeout=args.level_timeout)


def sweep(args) -> dict:
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    results = describe_run(args)
    prompt_list = prompts(args.prompt_words)
    with maybe_server(args):
        warm_up(args, prompt_list)
        for concurrency in args.concurrency:
            level = run_level(args, concurrency, prompt_list)
            results["levels"].append(level)
            print(summary_line(level), flush=True)
            write_json(results, args)  # after every level: a long GPU sweep cut short keeps what it measured
    return results


def summary_line(level: dict) -> str:
    if level["returncode"] != 0:
        return f"concurrency {level['concurrency']}: perf_analyzer failed ({level['returncode']})"
    ms = {k: level[k].get("p50", 0) * 1e3 for k in ("ttft_s", "itl_s")}
    return (f"concurrency {level['concurrency']:>4}: {level['output_tokens_per_s']:9.1f} output tok/s "
            f"{level['requests_per_s']:7.2f} req/s  TTFT p50 {ms['ttft_s']:8.1f} ms  ITL p50 {ms['itl_s']:7.2f} ms")


def write_json(results: dict, args) -> Path:
    path = Path(args.out_dir) / f"{results['label']}-sweep.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


# ---- plots ----

def plot(results: dict, out_dir: Path) -> list[Path]:
    """Throughput against concurrency, and TTFT / ITL percentiles against concurrency (PNG)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (python -m perf.sweep --plot-only <json> elsewhere)")
        return []
    matplotlib.use("Agg")
    levels = [lv for lv in results["levels"] if lv["returncode"] == 0]
    title = f"{results['label']}: {results['device']}\nmax_tokens {results['max_tokens']}, commit {results['commit']}"
    return [_throughput_plot(levels, title, out_dir / f"{results['label']}-throughput.png"),
            _percentile_plot(levels, "ttft_s", "time to first token (ms)", title,
                             out_dir / f"{results['label']}-ttft.png"),
            _percentile_plot(levels, "itl_s", "inter-token latency (ms)", title,
                             out_dir / f"{results['label']}-itl.png")]


def _throughput_plot(levels: list[dict], title: str, path: Path) -> Path:
    """Output tokens/s; each point is labelled with its requests/s (a second line would only repeat the
    first when every output has the same length)."""
    import matplotlib.pyplot as plt

    x = [lv["concurrency"] for lv in levels]
    y = [lv["output_tokens_per_s"] for lv in levels]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(x, y, marker="o", label="output tokens/s")
    for cx, cy, lv in zip(x, y, levels):
        ax.annotate(f"{lv['requests_per_s']:.2f} req/s", (cx, cy), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    _concurrency_axis(ax, x)
    ax.set_ylim(top=max(y, default=1) * 1.15)
    return _save(fig, ax, title, path)


def _percentile_plot(levels: list[dict], key: str, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    x = [lv["concurrency"] for lv in levels]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(x, [lv[key].get(q, float("nan")) * 1e3 for lv in levels], style, label=q)
    server_key = "server_" + key.replace("_s", "_mean_s")
    if any(lv.get(server_key) for lv in levels):
        ax.plot(x, [(lv.get(server_key) or float("nan")) * 1e3 for lv in levels], "x-.", color="gray",
                label="server mean (tritium metrics)")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel(ylabel)
    _concurrency_axis(ax, x)
    ax.legend()
    return _save(fig, ax, title, path)


def _concurrency_axis(ax, x: list[int]) -> None:
    if len(x) > 1 and max(x) / max(min(x), 1) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(c) for c in x])
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def _save(fig, ax, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- command line ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001", help="tritonserver gRPC address")
    parser.add_argument("--metrics-url", default=None, help="tritonserver metrics address (host:port)")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=0, help="pad prompts to this many words (0: as is)")
    parser.add_argument("--requests-per-window", type=int, default=8)
    parser.add_argument("--level-timeout", type=float, default=600.0, help="seconds per concurrency level")
    parser.add_argument("--label", default="sweep", help="names the output files")
    parser.add_argument("--device", default=None, help="device description for the JSON and plots")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out-dir", default="perf/results")
    parser.add_argument("--start-server", action="store_true", help="start tritonserver on --model-repository")
    parser.add_argument("--model-repository", default="model_repo")
    parser.add_argument("--ports", type=lambda s: [int(p) for p in s.split(",")], default=[8000, 8001, 8002],
                        help="with --start-server: HTTP,gRPC,metrics ports")
    parser.add_argument("--plot-only", default=None, metavar="JSON", help="only draw the plots of this JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        path = Path(args.plot_only)
        for png in plot(json.loads(path.read_text()), path.parent):
            print(png)
        return 0
    results = sweep(args)
    print(write_json(results, args))
    for png in plot(results, Path(args.out_dir)):
        print(png)
    return 0 if results["levels"] and all(lv["returncode"] == 0 for lv in results["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
