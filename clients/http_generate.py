"""Call the `ensemble` through Triton's HTTP generate extension (stdlib only).

    python -m clients.http_generate --prompt "What is the capital of France?" --chat             # /generate
    python -m clients.http_generate --prompt "Tell me a story" --stream --max-tokens 128           # /generate_stream (SSE)

The JSON body holds the input names as keys (text_input, max_tokens, stream, ...); keys that are not inputs,
such as apply_chat_template, travel as request parameters.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Iterator

from clients.options import add_common_options, sampling_inputs


class GenerateError(RuntimeError):
    pass


def _post(url: str, body: dict, timeout: float):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise GenerateError(f"HTTP {exc.code}: {detail}") from None


def generate(body: dict, url: str = "localhost:8000", model: str = "ensemble", timeout: float = 300) -> dict:
    """POST /v2/models/<model>/generate: exactly one response, as a dict of outputs."""
    with _post(f"http://{url}/v2/models/{model}/generate", body, timeout) as response:
        return json.loads(response.read())


def generate_stream(body: dict, url: str = "localhost:8000", model: str = "ensemble",
                    timeout: float = 300) -> Iterator[dict]:
    """POST /v2/models/<model>/generate_stream: yields each server-sent event's JSON object."""
    with _post(f"http://{url}/v2/models/{model}/generate_stream", body, timeout) as response:
        yield from parse_sse(response)


def parse_sse(lines) -> Iterator[dict]:
    """Server-sent events: `data:` lines (joined when split over several), an event ends at a blank line."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n") if isinstance(raw, bytes) else raw.rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line and data:
            yield _event("\n".join(data))
            data = []
    if data:
        yield _event("\n".join(data))


def _event(payload: str) -> dict:
    event = json.loads(payload)
    if isinstance(event, dict) and "error" in event:
        raise GenerateError(event["error"])
    return event


def build_body(args: argparse.Namespace) -> dict:
    body = {"text_input": args.prompt, "max_tokens": args.max_tokens, "stream": args.stream,
            "exclude_input_in_output": not args.echo, **sampling_inputs(args)}
    if args.chat:
        body["apply_chat_template"] = True
    return body


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clients.http_generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser, default_url="localhost:8000")
    parser.add_argument("--stream", action="store_true", help="use generate_stream and print text as it arrives")
    parser.add_argument("--echo", action="store_true", help="prepend the prompt (exclude_input_in_output false)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    body = build_body(args)
    try:
        if args.stream:
            for event in generate_stream(body, args.url, args.model):
                sys.stdout.write(event.get("text_output", ""))
                sys.stdout.flush()
        else:
            sys.stdout.write(generate(body, args.url, args.model).get("text_output", ""))
    except (GenerateError, OSError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
