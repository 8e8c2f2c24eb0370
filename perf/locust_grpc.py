"""Locust: streaming generation over gRPC (tritonclient start_stream / async_stream_infer, decoupled model).

    .venv/bin/locust -f perf/locust_grpc.py --host localhost:8001 --headless -u 8 -r 8 -t 60s \\
        --max-tokens 64 --only-summary

The same inputs genai-perf sends with `--service-kind triton --backend tensorrtllm` (text_input, max_tokens,
stream=true, exclude_input_in_output=true), plus return_num_output_tokens for exact token counts. Reports
time to first token, inter-token latency, request latency and output tokens/s as locust statistics (table in
perf/locust_common.py). --host is the gRPC address (host:port; a scheme is dropped); default localhost:8001.
"""
from __future__ import annotations

import os
import queue
import sys

import grpc.experimental.gevent as grpc_gevent
from locust import User, task

# gRPC's C core blocks in its own threads; this makes it cooperate with locust's gevent greenlets.
grpc_gevent.init_gevent()

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clients.grpc_stream import build_inputs  # noqa: E402
from perf.locust_common import StreamTiming, min_tokens, prompt_text, report, setup_locustfile  # noqa: E402

BUDGET = setup_locustfile()


def grpc_address(host: str) -> str:
    return host.split("://", 1)[-1].rstrip("/")


class GrpcStreamUser(User):
    host = "localhost:8001"

    def on_start(self):
        self.responses: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(grpc_address(self.host))
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def on_stop(self):
        self.client.stop_stream(cancel_requests=True)
        self.client.close()

    @task
    def generate(self):
        options = self.environment.parsed_options
        number = BUDGET.take(self.environment)
        inputs = build_inputs(prompt_text(options, number), options.max_tokens, stream=True,
                              return_num_output_tokens=True, min_tokens=min_tokens(options))
        timing, error = StreamTiming(), None
        try:
            self.client.async_stream_infer(options.model, inputs, request_id=str(number),
                                           enable_empty_final_response=True)
            self._read_stream(timing, options.request_timeout)
        except Exception as exc:  # every failure is a failed request in the statistics, never a crashed user
            error = exc
        report(self.environment, "GRPC", options.model, timing, error, BUDGET)

    def _read_stream(self, timing: StreamTiming, timeout: float) -> None:
        """Until the final response; the empty final response (after a final data response) is not timed."""
        while True:
            result, error = self.responses.get(timeout=timeout)
            if error is not None:
                raise error
            response = result.get_response()
            if response.outputs:
                text = result.as_numpy("text_output")
                count = result.as_numpy("num_output_tokens")
                timing.response(_text(text), int(np.asarray(count).reshape(-1)[0]) if count is not None else None)
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return


def _text(array) -> str:
    if array is None:
        return ""
    value = np.asarray(array).reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
