"""Stream tokens from the `ensemble` over gRPC (tritonclient start_stream / async_stream_infer).

    python -m clients.grpc_stream --prompt "What is the capital of France?" --chat --max-tokens 64
    python -m clients.grpc_stream --prompt "Once upon a time" --temperature 0.8 --seed 7 --stop "." --url localhost:8001

gRPC streaming is the path on which client cancellation reaches the model: Ctrl-C cancels the request and
the server frees its KV cache blocks.
"""
from __future__ import annotations

import argparse
import queue
import sys
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import tritonclient.grpc as grpcclient

from clients.options import add_common_options, sampling_inputs

INT32 = ("max_tokens", "top_k", "min_tokens", "end_id", "beam_width", "num_return_sequences")
FP32 = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
BOOL = ("stream", "exclude_input_in_output", "return_log_probs", "return_num_input_tokens",
        "return_num_output_tokens", "return_perf_metrics")


def build_inputs(prompt: str, max_tokens: int, stream: bool = True, exclude_input_in_output: bool = True,
                 stop_words: list[str] | None = None, bad_words: list[str] | None = None, **params) -> list:
    """The ensemble's input tensors (INTERFACE.md), batch size 1; params left None are not sent."""
    values = dict(params, max_tokens=max_tokens, stream=stream, exclude_input_in_output=exclude_input_in_output)
    tensors = [_tensor("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES")]
    for name, value in values.items():
        if value is None:
            continue
        if name in INT32:
            tensors.append(_tensor(name, np.array([[value]], dtype=np.int32), "INT32"))
        elif name in FP32:
            tensors.append(_tensor(name, np.array([[value]], dtype=np.float32), "FP32"))
        elif name in BOOL:
            tensors.append(_tensor(name, np.array([[value]], dtype=bool), "BOOL"))
        elif name == "seed":
            tensors.append(_tensor(name, np.array([[value]], dtype=np.uint64), "UINT64"))
        else:
            raise ValueError(f"unknown input {name!r}")
    for name, words in (("stop_words", stop_words), ("bad_words", bad_words)):
        if words:
            tensors.append(_tensor(name, np.array([[w.encode() for w in words]], dtype=np.object_), "BYTES"))
    return tensors


def _tensor(name: str, array: np.ndarray, datatype: str):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass
class StreamResult:
    """Everything one streamed request returned; `responses` holds each response's outputs by name."""

    text: str = ""
    responses: list[dict] = field(default_factory=list)
    error: str | None = None


class GrpcStreamClient:
    def __init__(self, url: str = "localhost:8001", model: str = "ensemble"):
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self._queue: queue.Queue = queue.Queue()
        self._open = False

    def _callback(self, result, error) -> None:
        self._queue.put((result, error))

    def stream(self, prompt: str, max_tokens: int, chat: bool = False, request_id: str = "", timeout: float = 300,
               **inputs) -> Iterator[dict]:
        """Yields each response's outputs as a dict; raises RuntimeError with the server's message on error."""
        parameters = {"apply_chat_template": True} if chat else None
        yield from self.stream_tensors(build_inputs(prompt, max_tokens, **inputs), parameters, request_id, timeout)

    def stream_tensors(self, tensors: list, parameters: dict | None = None, request_id: str = "",
                       timeout: float = 300) -> Iterator[dict]:
        """`stream` for input tensors built by the caller."""
        if not self._open:
            self.client.start_stream(callback=self._callback)
            self._open = True
        self.client.async_stream_infer(self.model, tensors, request_id=request_id, enable_empty_final_response=True,
                                       parameters=parameters)
        while True:
            result, error = self._queue.get(timeout=timeout)
            if error is not None:
                raise RuntimeError(str(error))
            response = result.get_response()
            outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
            if outputs:
                yield outputs
            if response.parameters["triton_final_response"].bool_param:
                return

    def generate(self, prompt: str, max_tokens: int, **kwargs) -> StreamResult:
        result = StreamResult()
        try:
            for outputs in self.stream(prompt, max_tokens, **kwargs):
                result.responses.append(outputs)
                result.text += text_of(outputs)
        except RuntimeError as exc:
            result.error = str(exc)
        return result

    def cancel(self) -> None:
        """Closes the stream, cancelling its requests on the server."""
        if self._open:
            self.client.stop_stream(cancel_requests=True)
            self._open = False
            self._queue = queue.Queue()

    def close(self) -> None:
        """Always close (or use `with`): an open stream keeps the interpreter from exiting, and keeps
        tritonserver 2.51 from unloading the ensemble at shutdown."""
        if self._open:
            self.client.stop_stream()
            self._open = False
        self.client.close()

    def __enter__(self) -> "GrpcStreamClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def text_of(outputs: dict) -> str:
    array = outputs.get("text_output")
    return "" if array is None else b"".join(bytes(x) for x in array.reshape(-1)).decode("utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clients.grpc_stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser, default_url="localhost:8001")
    parser.add_argument("--no-stream", action="store_true", help="ask for one response with the whole text")
    parser.add_argument("--usage", action="store_true", help="print token counts at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = GrpcStreamClient(args.url, args.model)
    counts = {}
    try:
        for outputs in client.stream(args.prompt, args.max_tokens, chat=args.chat, stream=not args.no_stream,
                                     return_num_input_tokens=args.usage, return_num_output_tokens=args.usage,
                                     **sampling_inputs(args)):
            sys.stdout.write(text_of(outputs))
            sys.stdout.flush()
            counts = {k: int(outputs[k].reshape(-1)[0]) for k in ("num_input_tokens", "num_output_tokens")
                      if k in outputs} or counts
    except RuntimeError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        client.cancel()
        print("\ncancelled", file=sys.stderr)
        return 130
    finally:
        client.close()
    print()
    if args.usage:
        print(counts, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
