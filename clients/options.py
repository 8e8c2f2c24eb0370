"""The command-line options both clients share: the prompt, the endpoint, and the sampling inputs."""
from __future__ import annotations

import argparse


def add_common_options(parser: argparse.ArgumentParser, default_url: str) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--url", default=default_url)
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--min-tokens", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--bad-word", action="append", help="word never to generate (repeatable)")


def sampling_inputs(args: argparse.Namespace) -> dict:
    """The ensemble inputs (INTERFACE.md names) the options set; those left unset are not sent."""
    values = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
              "min_tokens": args.min_tokens, "stop_words": args.stop, "bad_words": args.bad_word}
    return {name: value for name, value in values.items() if value is not None}
