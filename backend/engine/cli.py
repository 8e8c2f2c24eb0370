"""Generate from a checkpoint offline, streaming text to the terminal.

    python -m backend.engine.cli --prompt "What is the capital of France?"            # bundled SmolLM2
    python -m backend.engine.cli --model /path/to/hf_checkpoint --prompt "Hello" --max-tokens 64 --temperature 0.7
"""
from __future__ import annotations

import argparse
import sys
import time

from .async_engine import AsyncEngine
from .config import EngineConfig
from .errors import EngineError
from .sampling_params import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF checkpoint dir or .gguf file (default: bundled SmolLM2)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    return parser.parse_args(argv)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def stream_text(engine: AsyncEngine, prompt_ids: list[int], params: SamplingParams) -> int:
    """Prints text as tokens arrive (decoding the whole output each time keeps spaces and UTF-8 intact)."""
    tokens: list[int] = []
    printed = ""
    for output in engine.add_request("cli", prompt_ids, params):
        tokens += output.new_token_ids
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")
    return len(tokens)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        engine = AsyncEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
        prompt_ids = encode_prompt(engine.tokenizer, args.prompt, not args.no_chat_template)
        start = time.perf_counter()
        n = stream_text(engine, prompt_ids, params)
        elapsed = time.perf_counter() - start
        print(f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s]", file=sys.stderr)
        engine.shutdown()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
