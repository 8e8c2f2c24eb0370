"""Response bodies in OpenAI's shapes: whole completions, stream chunks, usage and log probabilities.

The engine returns the log probability of each chosen token, not the tokens' text nor the alternatives.
The token strings are recovered by tokenizing the returned text (exact for text the tokenizer round-trips,
which is nearly all of it; an end-of-sequence token has no text and is named by the tokenizer's eos_token);
`top_logprobs` is null (completions) or empty (chat).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Accumulated:
    """What a request has returned so far."""

    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


def finish_reason(engine_reason: str | None, completion_tokens: int | None, max_tokens: int) -> str:
    """The engine's reason when the ensemble passes it on; else inferred from the token count."""
    if engine_reason in ("stop", "length"):
        return engine_reason
    return "length" if completion_tokens is not None and completion_tokens >= max_tokens else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_strings(tokenizer, text: str, count: int) -> list[str]:
    """`count` token strings whose concatenation is `text` (best effort, see the module docstring)."""
    if count <= 0:
        return []
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    pieces = [tokenizer.decode([i]) for i in ids]
    if len(pieces) > count:  # the text tokenizes longer than generated: fold the rest into the last token
        pieces = pieces[:count - 1] + ["".join(pieces[count - 1:])]
    eos = getattr(tokenizer, "eos_token", None) or ""
    return pieces + [eos] * (count - len(pieces))


def completion_logprobs(tokenizer, text: str, logprobs: list[float], offset: int = 0) -> dict:
    tokens = token_strings(tokenizer, text, len(logprobs))
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokenizer, text: str, logprobs: list[float]) -> dict:
    tokens = token_strings(tokenizer, text, len(logprobs))
    content = [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
               for t, lp in zip(tokens, logprobs)]
    return {"content": content, "refusal": None}


def completion_choice(index: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def completion_body(request_id: str, model: str, choices: list[dict], usage_: dict | None,
                    chunk: bool = False) -> dict:
    body = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "system_fingerprint": None}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_choice(index: int, text: str, reason: str, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": reason}


def chat_body(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_, "system_fingerprint": None}


def chat_chunk(request_id: str, model: str, delta: dict, reason: str | None = None, logprobs: dict | None = None,
               usage_: dict | None = None, empty: bool = False, index: int = 0) -> dict:
    """A chat.completion.chunk of choice `index`; `empty` makes the usage-only last chunk (no choices), as OpenAI
    sends it."""
    choices = [] if empty else [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]
    body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, "system_fingerprint": None}
    if usage_ is not None:
        body["usage"] = usage_
    return body
