"""OpenAI request bodies (pydantic) and their mapping onto the ensemble's inputs (INTERFACE.md names).

Ranges follow OpenAI's API reference, so a request OpenAI would refuse is refused here with a 400 naming the
parameter before it reaches Triton. Extensions vLLM users send (`top_k`, `min_tokens`, `repetition_penalty`,
`ignore_eos`) are accepted too; other unknown fields are ignored, as OpenAI's own API does.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import invalid

MAX_STOP = 16  # OpenAI allows 4; the engine allows 64 token sequences (each stop string may need 2)
MAX_SEED = 2**64 - 1
MAX_CHOICES = 64  # the backend's num_return_sequences bound (request_parser.MAX_RETURN_SEQUENCES)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices: num_return_sequences of one request")
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style extensions
    top_k: int | None = Field(default=None, ge=0)
    min_tokens: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if value is None:
            return []
        words = [value] if isinstance(value, str) else value
        if len(words) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(words)}")
        return [w for w in words if w]

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return None

    def stop_words(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request (a string, or a list of exactly one string)")
            return value[0]
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported by this server")
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"only text content parts are supported, got type {part.get('type')!r}", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=0,
                                     description="the engine returns only the chosen token's log probability")
    tools: list[dict] | None = None
    response_format: dict | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, value):
        if value:
            raise ValueError("tools are not supported by this server")
        return None

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value):
        if value and value.get("type") not in (None, "text"):
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        return value

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def ensemble_inputs(request: SamplingFields, prompt: str, max_tokens: int, stream: bool, logprobs: bool,
                    prompt_ids: list[int] | None = None) -> dict:
    """The input tensors for one request; None values are not sent (the backend's defaults). With prompt_ids
    (for the engine model) the token ids replace the text."""
    temperature, top_p = request.temperature, request.top_p
    if top_p == 0.0:  # OpenAI allows 0 (keep only the most likely token); the engine wants (0, 1]: greedy
        temperature, top_p = 0.0, None
    return {
        "text_input": prompt if prompt_ids is None else None,
        "input_ids": prompt_ids,
        "max_tokens": max_tokens,
        "stream": stream,
        "exclude_input_in_output": True,
        "stop_words": request.stop_words() or None,
        "temperature": temperature,
        "top_p": top_p,
        "seed": request.seed,
        "frequency_penalty": request.frequency_penalty,
        "presence_penalty": request.presence_penalty,
        "top_k": request.top_k,
        "min_tokens": request.min_tokens,
        "repetition_penalty": request.repetition_penalty,
        "return_log_probs": logprobs or None,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
        "num_return_sequences": request.n if request.n > 1 else None,
    }


def request_parameters(request: SamplingFields) -> dict:
    """Triton request parameters: the frontend applies the chat template itself, so preprocessing never does."""
    params: dict = {"apply_chat_template": False}
    if request.ignore_eos:
        params["ignore_eos"] = True
    return params
