"""Generate the bundled SmolLM2's model repository (once), start tritonserver on it, ask a question over gRPC
streaming, and keep serving until Ctrl-C.

    python -m tools.quickstart                                  # answers "What is the capital of France?"
    python -m tools.quickstart --prompt "Write a haiku" --once  # answer, then stop the server
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tools.generate_repo import main as generate_repo
from tools.serve import TritonServer

DEFAULT_PROMPT = "What is the capital of France?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", default="model_repo")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--once", action="store_true", help="stop the server after the answer")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    return parser.parse_args(argv)


def ask(url: str, prompt: str, max_tokens: int) -> str:
    from clients.grpc_stream import GrpcStreamClient, text_of

    print(f"\n> {prompt}\n", flush=True)
    text = ""
    with GrpcStreamClient(url) as client:
        for outputs in client.stream(prompt, max_tokens, chat=True):
            delta = text_of(outputs)
            text += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
    print("\n")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo = Path(args.model_repository)
    if not (repo / "ensemble" / "config.pbtxt").is_file():
        print(f"generating the model repository {repo} for the bundled SmolLM2 ...", flush=True)
        if generate_repo(["--output-dir", str(repo)]) != 0:
            return 1
    log = repo.resolve().parent / "tritonserver.log"
    server = TritonServer(repo, args.http_port, args.grpc_port, args.metrics_port, log_path=log)
    print(f"starting tritonserver (log: {log}) ...", flush=True)
    start = time.monotonic()
    with server:
        print(f"ready in {time.monotonic() - start:.0f} s: gRPC {server.grpc_url}, HTTP {server.http_url}, "
              f"metrics localhost:{server.metrics_port}/metrics", flush=True)
        ask(server.grpc_url, args.prompt, args.max_tokens)
        if args.once:
            return 0
        print("serving; try: python -m clients.grpc_stream --chat --prompt \"Hello\"   (Ctrl-C stops)", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping ...", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
