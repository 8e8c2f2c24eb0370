"""Run the OpenAI-compatible frontend (optionally with tritonserver beside it).

    python -m clients.openai_frontend --triton-url localhost:8001 --port 9000 --model-repository model_repo
    python -m clients.openai_frontend --start-server --generate --model-repository model_repo --port 9000

With --start-server the frontend launches tritonserver on the repository (tools/serve.py: gRPC on the port of
--triton-url, HTTP on --triton-http-port, metrics on --triton-metrics-port), waits until it is ready, and
stops it on exit (Ctrl-C or SIGTERM).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .app import DEFAULT_MAX_BODY_BYTES, create_app
from .repository import find_models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clients.openai_frontend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", required=True,
                        help="the generated repository: served models and their tokenizers are read from it")
    parser.add_argument("--triton-url", default="localhost:8001", help="tritonserver's gRPC address")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"largest request body accepted, else 413 (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--max-in-flight", type=int, default=0,
                        help="requests in flight in this frontend before it answers 503 (default 0: no bound)")
    parser.add_argument("--route", choices=("engine", "ensemble"), default="engine",
                        help="engine (default): send token ids to the ensemble's engine model, so that a client "
                             "disconnect cancels the generation; ensemble: send text to the ensemble (tritonserver "
                             "2.51 does not pass cancellation into a running ensemble step)")
    parser.add_argument("--start-server", action="store_true", help="also start tritonserver on the repository")
    parser.add_argument("--generate", action="store_true",
                        help="with --start-server: generate the repository for the bundled SmolLM2 if missing")
    parser.add_argument("--triton-http-port", type=int, default=8000)
    parser.add_argument("--triton-metrics-port", type=int, default=8002)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.generate and not args.start_server:
        parser.error("argument --generate: only with --start-server")
    return args


def start_server(args: argparse.Namespace):
    from tools.serve import TritonServer

    repo = Path(args.model_repository)
    if args.generate and not (repo / "ensemble" / "config.pbtxt").is_file():
        from tools.generate_repo import main as generate
        if generate(["--output-dir", str(repo)]) != 0:
            raise SystemExit(1)
    grpc_port = int(args.triton_url.rsplit(":", 1)[-1])
    server = TritonServer(repo, args.triton_http_port, grpc_port, args.triton_metrics_port)
    print(f"starting tritonserver (gRPC :{grpc_port}, HTTP :{args.triton_http_port})", file=sys.stderr)
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        models = find_models(args.model_repository) if not args.generate else None
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = start_server(args) if args.start_server else None
    try:
        models = models or find_models(args.model_repository)
        app = create_app(models, args.triton_url, args.max_body_bytes, args.max_in_flight, args.route,
                         on_shutdown=server.stop if server is not None else None)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
