"""The mixed workload through a running tritonserver: N concurrent streaming requests over gRPC.

    python -m perf.load_mixed --url localhost:8001 --requests 256 --new-tokens 128

Sends token ids straight to the engine model (`llm`), so the prompts are exactly those of
perf/bench_engine.py's mixed workload (same seed, same lengths), and reports output tokens/s over the whole
run plus time-to-first-token percentiles. `--model ensemble --text` sends text through the ensemble instead.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import numpy as np


def random_prompts(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    """The same prompts as perf/bench_engine.py (torch's generator, same calls in the same order)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=gen).tolist()
    return [torch.randint(10, vocab, (length,), generator=gen).tolist() for length in lengths]


class Tracker:
    """Collects streamed responses from the gRPC callback thread."""

    def __init__(self, count: int):
        self.sent: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.errors: list[str] = []
        self.responses = 0
        self.remaining = count
        self.done = threading.Event()
        self.lock = threading.Lock()

    def callback(self, result, error) -> None:
        now = time.perf_counter()
        with self.lock:
            if error is not None:
                self.errors.append(str(error))
                self._finish_one()
                return
            self.responses += 1
            response = result.get_response()
            request_id = response.id
            self.first.setdefault(request_id, now)
            final = response.parameters.get("triton_final_response")
            count = result.as_numpy("num_output_tokens")
            if count is not None:
                self.tokens[request_id] = int(np.asarray(count).reshape(-1)[0])
            if final is not None and final.bool_param:
                self._finish_one()

    def _finish_one(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


def build_inputs(grpcclient, prompt, new_tokens: int, text: str | None):
    def tensor(name, value, dtype, triton_type):
        t = grpcclient.InferInput(name, list(value.shape), triton_type)
        t.set_data_from_numpy(value.astype(dtype))
        return t

    inputs = [tensor("max_tokens", np.array([[new_tokens]]), np.int32, "INT32"),
              tensor("min_tokens", np.array([[new_tokens]]), np.int32, "INT32"),
              tensor("stream", np.array([[True]]), np.bool_, "BOOL"),
              tensor("exclude_input_in_output", np.array([[True]]), np.bool_, "BOOL"),
              tensor("return_num_output_tokens", np.array([[True]]), np.bool_, "BOOL")]
    if text is None:
        inputs.append(tensor("input_ids", np.array([prompt]), np.int32, "INT32"))
    else:
        inputs.append(tensor("text_input", np.array([[text.encode()]], dtype=object), object, "BYTES"))
    return inputs


def run(args) -> dict:
    import tritonclient.grpc as grpcclient

    prompts = random_prompts(args.requests, args.min_prompt, args.max_prompt, args.vocab, args.seed)
    client = grpcclient.InferenceServerClient(args.url)
    tracker = Tracker(len(prompts))
    client.start_stream(callback=tracker.callback, stream_timeout=args.timeout)
    start, client_cpu_start = time.perf_counter(), time.process_time()
    for i, prompt in enumerate(prompts):
        request_id = f"mixed-{i}"
        tracker.sent[request_id] = time.perf_counter()
        text = " ".join(map(str, prompt)) if args.text else None
        client.async_stream_infer(args.model, build_inputs(grpcclient, prompt, args.new_tokens, text),
                                  request_id=request_id, enable_empty_final_response=True)
    finished = tracker.done.wait(args.timeout)
    elapsed = time.perf_counter() - start
    client_cpu_s = time.process_time() - client_cpu_start
    client.stop_stream()
    ttft = sorted(tracker.first[r] - tracker.sent[r] for r in tracker.first)
    output_tokens = sum(tracker.tokens.values())
    return {"requests": len(prompts), "completed": len(prompts) - tracker.remaining, "all_finished": finished,
            "errors": tracker.errors[:5], "output_tokens": output_tokens, "elapsed_s": elapsed,
            "output_tok_s": output_tokens / elapsed,
            # tokens per response > 1: the server coalesced tokens; client CPU near elapsed: the client saturated
            "responses": tracker.responses, "tokens_per_response": output_tokens / max(tracker.responses, 1),
            "client_cpu_s": client_cpu_s,
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))] if ttft else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--model", default="llm")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--text", action="store_true", help="send text_input instead of input_ids")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["all_finished"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
