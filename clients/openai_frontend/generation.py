"""One OpenAI request against the ensemble: prompt in, Triton responses folded into OpenAI bodies out.

`Generation.run()` serves a non-streamed request; `Generation.events()` serves a streamed one as
server-sent events. Both cancel the gRPC stream, and so the engine request, when they end early: the client
went away (the HTTP server cancels the handler or closes the event iterator), or a response failed.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from . import responses as R
from .errors import OpenAIError
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, ensemble_inputs, request_parameters
from .repository import ServedModel
from .triton import TritonCall, TritonClient, TritonResponse, build_request

log = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class Generation:
    """prompt_ids given: the request goes to the engine model with those ids; else to the ensemble as text.
    n choices are n sequences of one Triton request (num_return_sequences), told apart by sequence_index."""

    def __init__(self, client: TritonClient, model: ServedModel, request: SamplingFields, prompt: str,
                 max_tokens: int, chat: bool, prompt_ids: list[int] | None = None):
        self.model = model
        self.request = request
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.chat = chat
        self.want_logprobs = bool(request.logprobs) if chat else request.logprobs is not None
        self.id = R.new_id("chatcmpl" if chat else "cmpl")
        inputs = ensemble_inputs(request, prompt, max_tokens, request.stream, self.want_logprobs, prompt_ids)
        target = model.name if prompt_ids is None else model.engine
        self.call: TritonCall = client.call(build_request(target, self.id, inputs, request_parameters(request)))
        self.choices = [R.Accumulated() for _ in range(request.n)]
        self.echo = "" if chat or not request.echo else prompt

    # ---- non-streamed ----
    async def run(self) -> dict:
        try:
            async for response in self.call.responses():
                self._fold(response)
        finally:
            self.call.cancel()
        return self._body()

    def _fold(self, response: TritonResponse) -> None:
        if not 0 <= response.index < len(self.choices):
            raise OpenAIError(502, f"the server answered sequence {response.index} of {len(self.choices)}",
                              "server_error")
        acc = self.choices[response.index]
        acc.text += response.text
        acc.logprobs += response.logprobs or []
        acc.prompt_tokens = response.num_input_tokens if response.num_input_tokens is not None else acc.prompt_tokens
        acc.completion_tokens = (response.num_output_tokens if response.num_output_tokens is not None
                                 else acc.completion_tokens)
        acc.finish_reason = response.finish_reason or acc.finish_reason

    def _usage(self) -> dict:
        """The prompt once, the completion tokens of every choice (as OpenAI counts n > 1)."""
        prompt_tokens = next((a.prompt_tokens for a in self.choices if a.prompt_tokens is not None), None)
        if prompt_tokens is None:  # the server did not say: count as preprocessing does
            prompt_tokens = len(self.model.tokenizer(self.prompt, add_special_tokens=not self.chat)["input_ids"])
        return R.usage(prompt_tokens, sum(a.completion_tokens or 0 for a in self.choices))

    def _reason(self, acc: R.Accumulated) -> str:
        return R.finish_reason(acc.finish_reason, acc.completion_tokens, self.max_tokens)

    def _body(self) -> dict:
        tok, choices = self.model.tokenizer, []
        for index, acc in enumerate(self.choices):
            if self.chat:
                logprobs = R.chat_logprobs(tok, acc.text, acc.logprobs) if self.want_logprobs else None
                choices.append(R.chat_choice(index, acc.text, self._reason(acc), logprobs))
            else:
                logprobs = (R.completion_logprobs(tok, acc.text, acc.logprobs, len(self.echo)) if self.want_logprobs
                            else None)
                choices.append(R.completion_choice(index, self.echo + acc.text, self._reason(acc), logprobs))
        if self.chat:
            return R.chat_body(self.id, self.model.name, choices, self._usage())
        return R.completion_body(self.id, self.model.name, choices, self._usage())

    # ---- streamed ----
    async def start_stream(self) -> AsyncIterator[str]:
        """Waits for the first response, so that a refused request still gets its HTTP error status."""
        responses = self.call.responses()
        try:
            first = await responses.__anext__()
        except BaseException:
            self.call.cancel()
            raise
        return self._events(first, responses)

    async def _events(self, first: TritonResponse, responses: AsyncIterator[TritonResponse]) -> AsyncIterator[str]:
        try:
            for event in self._opening():
                yield event
            response = first
            while True:
                self._fold(response)
                for event in self._delta_events(response):
                    yield event
                if response.final:
                    break
                response = await responses.__anext__()
            for event in self._closing():
                yield event
        except OpenAIError as exc:
            yield sse(exc.body())
        finally:
            if not self.call.finished:
                log.info("request %s ended before its final response: cancelling it on the server", self.id)
            self.call.cancel()  # synchronous: no await may run in a cancelled task
        yield DONE

    def _opening(self) -> list[str]:
        name, indices = self.model.name, range(len(self.choices))
        if self.chat:
            return [sse(R.chat_chunk(self.id, name, {"role": "assistant", "content": ""}, index=i)) for i in indices]
        if self.echo:
            return [sse(R.completion_body(self.id, name, [R.completion_choice(i, self.echo, None, None)], None,
                                          chunk=True)) for i in indices]
        return []

    def _delta_events(self, response: TritonResponse) -> list[str]:
        logprobs = response.logprobs or []
        if not response.text and not logprobs:
            return []
        tok, name, index = self.model.tokenizer, self.model.name, response.index
        if self.chat:
            lp = R.chat_logprobs(tok, response.text, logprobs) if self.want_logprobs else None
            return [sse(R.chat_chunk(self.id, name, {"content": response.text}, None, lp, index=index))]
        offset = len(self.echo) + len(self.choices[index].text) - len(response.text)
        lp = R.completion_logprobs(tok, response.text, logprobs, offset) if self.want_logprobs else None
        choice = R.completion_choice(index, response.text, None, lp)
        return [sse(R.completion_body(self.id, name, [choice], None, chunk=True))]

    def _closing(self) -> list[str]:
        name = self.model.name
        usage = self._usage() if self.request.include_usage() else None
        reasons = [(i, self._reason(acc)) for i, acc in enumerate(self.choices)]
        if self.chat:
            events = [sse(R.chat_chunk(self.id, name, {}, reason, index=i)) for i, reason in reasons]
            if usage:
                events.append(sse(R.chat_chunk(self.id, name, {}, usage_=usage, empty=True)))
            return events
        events = [sse(R.completion_body(self.id, name, [R.completion_choice(i, "", reason, None)], None, chunk=True))
                  for i, reason in reasons]
        if usage:
            events.append(sse(R.completion_body(self.id, name, [], usage, chunk=True)))
        return events


async def run_until_disconnect(coro, receive) -> dict | None:
    """Runs a non-streamed generation; None (and the generation cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()  # Generation.run's finally cancels the gRPC stream
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    return None


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def completion_generation(client: TritonClient, model: ServedModel, request: CompletionRequest,
                          prompt_ids: list[int] | None) -> Generation:
    return Generation(client, model, request, request.prompt, request.max_tokens, False, prompt_ids)


def chat_generation(client: TritonClient, model: ServedModel, request: ChatCompletionRequest, prompt: str,
                    max_tokens: int, prompt_ids: list[int] | None) -> Generation:
    return Generation(client, model, request, prompt, max_tokens, True, prompt_ids)
