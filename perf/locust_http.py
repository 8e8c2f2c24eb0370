"""Locust: streaming generation over Triton's HTTP generate extension (server-sent events).

    .venv/bin/locust -f perf/locust_http.py --host http://localhost:8000 --headless -u 8 -r 8 -t 60s \\
        --max-tokens 64 --only-summary

Each user posts `{"text_input", "max_tokens", "stream": true, "exclude_input_in_output": true, ...}` (the
TensorRT-LLM backend's inputs) to /v2/models/<model>/generate_stream, reads the events as they arrive and
reports time to first token, inter-token latency, request latency and output tokens/s as locust statistics
(table in perf/locust_common.py). Without --host it calls http://localhost:8000.
"""
from __future__ import annotations

import json
import os
import sys

import requests
from locust import User, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from perf.locust_common import StreamTiming, min_tokens, prompt_text, report, setup_locustfile  # noqa: E402

BUDGET = setup_locustfile()


class StreamError(RuntimeError):
    pass


def request_body(options, number: int) -> dict:
    body = {"text_input": prompt_text(options, number), "max_tokens": options.max_tokens, "stream": True,
            "exclude_input_in_output": True, "return_num_output_tokens": True}
    if min_tokens(options):
        body["min_tokens"] = min_tokens(options)
    return body


def sse_events(response):
    """Each `data:` event's JSON object, as it arrives (Triton sends one line per event, then a blank line)."""
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            event = json.loads(line[5:])
            if "error" in event:
                raise StreamError(event["error"])
            yield event


class GenerateStreamUser(User):
    host = "http://localhost:8000"

    def on_start(self):
        self.session = requests.Session()

    @task
    def generate_stream(self):
        options = self.environment.parsed_options
        number = BUDGET.take(self.environment)
        url = f"{self.host.rstrip('/')}/v2/models/{options.model}/generate_stream"
        timing, error = StreamTiming(), None
        try:
            with self.session.post(url, json=request_body(options, number), stream=True,
                                   timeout=options.request_timeout) as response:
                if response.status_code != 200:
                    raise StreamError(f"HTTP {response.status_code}: {response.text[:500]}")
                for event in sse_events(response):
                    timing.response(event.get("text_output", ""), _output_tokens(event))
        except Exception as exc:  # every failure is a failed request in the statistics, never a crashed user
            error = exc
        report(self.environment, "STREAM", options.model, timing, error, BUDGET)


def _output_tokens(event: dict) -> int | None:
    value = event.get("num_output_tokens")
    if isinstance(value, list):  # a [1] tensor may come back as a list
        value = value[0] if value else None
    return int(value) if value is not None else None
