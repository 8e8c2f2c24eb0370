"""The OpenAI-compatible frontend (clients/openai_frontend) with the official `openai` client, against a real
tritonserver on the bundled SmolLM2 (CPU): completions and chat, streamed and not, stop sequences, usage
equal to the tokenizer's counts, log probabilities, errors in OpenAI's format, and a client disconnect
that frees the engine request.
"""
from __future__ import annotations

import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from tests.openai_frontend.fixtures import frontend, oai_repo, oai_triton  # noqa: F401
from tests.triton_helpers import free_ports, wait_for_metrics

pytestmark = [pytest.mark.server, pytest.mark.slow]

FRANCE = "What is the capital of France?"
CHAT = [{"role": "user", "content": FRANCE}]
MODEL = "ensemble"


@pytest.fixture(scope="module")
def client(frontend):
    return openai.OpenAI(base_url=frontend, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(oai_repo):
    return AutoTokenizer.from_pretrained(oai_repo / "preprocessing" / "1" / "tokenizer")


def chat_prompt_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_models_lists_the_served_ensemble(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_usage_and_logprobs_match_the_tokenizer(client, tokenizer):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=1)
    choice = out.choices[0]
    assert "Paris" in choice.text and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert out.usage.completion_tokens == 8 == len(tokenizer(choice.text, add_special_tokens=False)["input_ids"])
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    lp = choice.logprobs
    assert len(lp.token_logprobs) == 8 and all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0


def test_completion_streaming_equals_the_whole_answer(client):
    prompt = "Once upon a time"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len([c for c in chunks if c.choices and c.choices[0].text]) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_answers_paris_with_the_tokenizers_counts(client, tokenizer):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32)
    message, reason = out.choices[0].message, out.choices[0].finish_reason
    assert message.role == "assistant" and "Paris" in message.content and reason == "stop"
    assert out.usage.prompt_tokens == chat_prompt_tokens(tokenizer, CHAT)
    # the end-of-sequence token is generated (and counted) but has no text
    assert out.usage.completion_tokens == len(tokenizer(message.content, add_special_tokens=False)["input_ids"]) + 1


def test_chat_streaming_deltas_join_to_the_whole_answer(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, logprobs=True)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == out.choices[0].message.content
    assert all(t.logprob <= 0 for t in content)


def test_stop_sequences_cut_the_text_streamed_or_not(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32, stop="is Par")
    assert out.choices[0].message.content == "The capital of France " and out.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32, stop=["never", "is Par"],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "The capital of France "
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, stop=[".", "!"])
    assert out.choices[0].text == " Paris" and out.choices[0].finish_reason == "stop"


def test_seeded_sampling_with_penalties_repeats(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}], max_tokens=12,
                  temperature=1.0, top_p=0.9, seed=1234, presence_penalty=0.5, frequency_penalty=0.5)
    first, second = (client.chat.completions.create(**kwargs).choices[0].message.content for _ in range(2))
    assert first == second and first


def test_n_choices_are_the_sequences_of_one_request_seeded_apart(client):
    """n > 1 runs as num_return_sequences; with a seed, choice i equals a one-choice request seeded seed + i.
    Usage counts the prompt once and every choice's tokens; streamed chunks carry their choice's index."""
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}], max_tokens=10, temperature=1.0)
    alone = [client.chat.completions.create(**chat, seed=77 + i) for i in range(3)]
    texts = [out.choices[0].message.content for out in alone]
    assert len(set(texts)) > 1  # the seeds give different answers, so the test can tell them apart
    out = client.chat.completions.create(**chat, seed=77, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2] and [c.message.content for c in out.choices] == texts
    assert [c.finish_reason for c in out.choices] == [a.choices[0].finish_reason for a in alone]
    assert out.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert out.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**chat, seed=77, n=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                           seed=5, n=2, echo=True)
    single = [client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                        seed=5 + i, echo=True).choices[0].text for i in range(2)]
    assert [c.text for c in completion.choices] == single and single[0].startswith("Once upon a time")


def test_bad_requests_get_openai_errors(client, frontend):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="Hi", top_p=1.5)
    with pytest.raises(openai.BadRequestError, match="min_tokens: must be <= max_tokens"):  # refused by the backend
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"min_tokens": 8})
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model=MODEL, prompt="Hi", n=65)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert info.value.body["code"] == "model_not_found"
    too_big = httpx.post(f"{frontend}/completions", json={"model": MODEL, "prompt": "x" * (2 << 20)})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    broken = httpx.post(f"{frontend}/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    assert set(httpx.get(f"{frontend}/nowhere").json()["error"]) == {"message", "type", "param", "code"}


def test_unreachable_triton_is_503(oai_repo):
    from clients.openai_frontend.app import create_app
    from clients.openai_frontend.repository import find_models

    (port,) = free_ports(1)
    with TestClient(create_app(find_models(oai_repo), f"localhost:{port}")) as app:
        response = app.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
        assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"
        assert app.get("/health").status_code == 503


def test_disconnect_mid_stream_frees_the_engine_request(client, frontend, oai_triton):
    port = oai_triton.metrics_port
    wait_for_metrics(port, lambda m: m["num_running"] == 0 and m["kv_blocks_used"] == 0)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Write a long story."}],
                                            max_tokens=400, stream=True, extra_body={"min_tokens": 400})
    chunks = iter(stream)
    for _ in range(4):
        next(chunks)
    busy = wait_for_metrics(port, lambda m: m["num_running"] == 1 and m["kv_blocks_used"] > 0)
    assert busy["num_running"] == 1 and busy["kv_blocks_used"] > 0
    stream.close()  # the HTTP connection goes away mid-stream
    start = time.monotonic()
    after = wait_for_metrics(port, lambda m: m["num_running"] == 0 and m["kv_blocks_used"] == 0, timeout=30)
    print(f"engine request freed {time.monotonic() - start:.2f} s after the disconnect")
    assert after["num_running"] == 0 and after["kv_blocks_used"] == 0, after
    assert after["steps"] - busy["steps"] < 200  # far fewer steps than the 400 tokens asked for
    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{frontend}/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 400,
                                                    "min_tokens": 400}, timeout=2)
    after = wait_for_metrics(port, lambda m: m["num_running"] == 0 and m["kv_blocks_used"] == 0, timeout=10)
    assert after["num_running"] == 0 and after["kv_blocks_used"] == 0, after
    assert "Paris" in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16).choices[0].message.content


def test_ensemble_route_gives_the_same_answers(oai_repo, oai_triton, client):
    """--route ensemble sends text to the ensemble (no cancellation on tritonserver 2.51, same answers)."""
    from clients.openai_frontend.app import create_app
    from clients.openai_frontend.repository import find_models

    expected = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, stop="Paris")
    with TestClient(create_app(find_models(oai_repo), oai_triton.grpc_url, route="ensemble")) as app:
        body = app.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 16,
                                                      "stop": "Paris"}).json()
    assert body["choices"][0]["message"]["content"] == expected.choices[0].message.content
    assert body["usage"] == expected.usage.model_dump(exclude_none=True)
