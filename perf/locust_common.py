"""What the HTTP and gRPC locust files share: command-line options, prompts, per-request timings and how they
reach locust's statistics.

Each streamed request fires four entries through `events.request` (so they show in locust's table, its CSV
and JSON, and its web UI, with percentiles):

| type    | name    | "response time" column holds                                   | length column   |
|---------|---------|----------------------------------------------------------------|-----------------|
| STREAM / GRPC | model | request latency, ms (send -> final response)             | output tokens   |
| TTFT    | model   | time to first token, ms (send -> first streamed response)      | 0               |
| ITL     | model   | inter-token latency, ms: (last - first response) / (tokens - 1) | 0             |
| TOK/S   | model   | output tokens per second of this request (not ms)             | output tokens   |

A failed request counts as one failure of its STREAM/GRPC entry and fires nothing else. At the end the run's
output throughput (all output tokens / wall time) is printed and stored in environment.stats as
`custom_output_tokens_per_s`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import gevent
from locust import events
from locust.exception import StopUser

log = logging.getLogger("tritium.locust")

DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."


def add_arguments(parser) -> None:
    """Options every tritium locust file takes (after locust's own), e.g. `--max-tokens 64`."""
    group = parser.add_argument_group("tritium")
    group.add_argument("--model", default="ensemble", help="Triton model to call (default: ensemble)")
    group.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt; each request prefixes its number")
    group.add_argument("--prompt-words", type=int, default=0,
                       help="pad the prompt with this many extra words (longer prompts without a data set)")
    group.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    group.add_argument("--min-tokens", type=int, default=-1,
                       help="min_tokens of each request (default -1: equal to --max-tokens, fixed-length outputs "
                            "as benchmarks use; 0 lets end-of-sequence stop a request early)")
    group.add_argument("--max-requests", type=int, default=0,
                       help="stop the run after this many requests have ended (0: run until --run-time)")
    group.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request fails")


@dataclass
class StreamTiming:
    """Times (perf_counter seconds) and counts of one streamed request."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    num_responses: int = 0
    num_output_tokens: int = 0  # from the num_output_tokens output when sent, else the non-empty responses

    def response(self, text: str, num_output_tokens: int | None) -> None:
        now = time.perf_counter()
        self.first = self.first if self.first is not None else now
        self.last = now
        self.num_responses += 1
        if num_output_tokens is not None:
            self.num_output_tokens = num_output_tokens
        elif text:
            self.num_output_tokens += 1

    def latency_s(self) -> float:
        return (self.last or time.perf_counter()) - self.start

    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.start

    def itl_s(self) -> float | None:
        if self.first is None or self.num_output_tokens < 2:
            return None
        return (self.last - self.first) / (self.num_output_tokens - 1)


def min_tokens(options) -> int | None:
    """The min_tokens to send (None: send none)."""
    value = options.max_tokens if options.min_tokens < 0 else options.min_tokens
    return value or None


def prompt_text(options, number: int) -> str:
    """Each request's prompt differs at its start, so the prefix cache does not turn the test into a replay."""
    padding = " ".join(f"w{i % 97}" for i in range(options.prompt_words))
    return f"{number}. {options.prompt} {padding}".rstrip()


class RequestBudget:
    """Hands out request numbers and stops the run once --max-requests requests have ended."""

    def __init__(self):
        self.issued = 0
        self.ended = 0
        self.output_tokens = 0
        self.started_at: float | None = None
        self.ended_at: float | None = None

    def take(self, environment) -> int:
        """The next request's number; stops the calling user when the budget is spent."""
        limit = environment.parsed_options.max_requests
        if limit and self.issued >= limit:
            raise StopUser()
        self.started_at = self.started_at or time.perf_counter()
        self.issued += 1
        return self.issued

    def end(self, environment, output_tokens: int) -> None:
        self.ended += 1
        self.output_tokens += output_tokens
        self.ended_at = time.perf_counter()
        limit = environment.parsed_options.max_requests
        if limit and self.ended >= limit and environment.runner is not None:
            gevent.spawn_later(0.1, environment.runner.quit)  # not from inside this user's greenlet

    def output_tokens_per_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None or self.ended_at <= self.started_at:
            return None
        return self.output_tokens / (self.ended_at - self.started_at)


def report(environment, request_type: str, name: str, timing: StreamTiming, error: Exception | None,
           budget: RequestBudget) -> None:
    """Fires the request's entries into locust's statistics (see the module docstring)."""
    fire = environment.events.request.fire
    if error is None and timing.first is None:
        error = RuntimeError("the stream ended without a response")
    fire(request_type=request_type, name=name, response_time=timing.latency_s() * 1000,
         response_length=timing.num_output_tokens, exception=error, context={})
    budget.end(environment, 0 if error else timing.num_output_tokens)
    if error is not None:
        return
    fire(request_type="TTFT", name=name, response_time=timing.ttft_s() * 1000, response_length=0, exception=None,
         context={})
    if timing.itl_s() is not None:
        fire(request_type="ITL", name=name, response_time=timing.itl_s() * 1000, response_length=0,
             exception=None, context={})
    tokens_per_s = timing.num_output_tokens / max(timing.latency_s(), 1e-9)
    fire(request_type="TOK/S", name=name, response_time=tokens_per_s, response_length=timing.num_output_tokens,
         exception=None, context={})


def setup_locustfile() -> RequestBudget:
    """What every tritium locustfile does at import: our command-line options, and a request budget whose
    output throughput is logged when locust quits. Returns the budget."""
    events.init_command_line_parser.add_listener(add_arguments)
    budget = RequestBudget()
    register_throughput_report(budget)
    return budget


def register_throughput_report(budget: RequestBudget) -> None:
    @events.quitting.add_listener
    def _print_throughput(environment, **_):
        rate = budget.output_tokens_per_s()
        environment.stats.custom_output_tokens_per_s = rate
        if rate is not None:
            log.info("output throughput: %.1f tokens/s over %d requests (%d output tokens)",
                     rate, budget.ended, budget.output_tokens)
