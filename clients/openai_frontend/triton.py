"""The frontend's only way to tritonserver: one gRPC bidirectional stream (ModelStreamInfer) per request.

A stream per request, not one shared stream, because cancelling a stream is what makes Triton cancel the
request inside it: when the HTTP client goes away, `TritonCall.cancel()` cancels the gRPC call, Triton marks
the request cancelled, and the tritium backend aborts the engine request and frees its KV blocks.
The request side of the stream stays open until the last response has arrived (a half-closed stream is not
a cancellation, but keeping it open costs nothing and leaves the server no room for doubt).
"""
from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .errors import OpenAIError, from_triton_message

MAX_MESSAGE_BYTES = 64 << 20
INT32 = ("max_tokens", "top_k", "min_tokens", "num_return_sequences")
FP32 = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
BOOL = ("stream", "exclude_input_in_output", "return_log_probs", "return_num_input_tokens",
        "return_num_output_tokens")
UINT64 = ("seed",)
STRINGS = ("stop_words", "bad_words")
NUMPY = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64, "INT64": np.int64}


@dataclass
class TritonResponse:
    """One streamed response of the ensemble: the text delta and whatever counts came with it."""

    text: str
    final: bool
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    index: int = 0  # sequence_index: which of the request's num_return_sequences this response belongs to


def build_request(model: str, request_id: str, inputs: dict, parameters: dict) -> service_pb2.ModelInferRequest:
    """The ensemble's tensors (INTERFACE.md names; the engine model also takes input_ids), batch size 1;
    inputs left None are not sent."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, value in inputs.items():
        if value is not None:
            _add_input(request, name, value)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for key, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].string_param = str(value)
    return request


def _add_input(request, name: str, value) -> None:
    if name == "input_ids":
        datatype, raw, shape = "INT32", np.asarray(value, dtype=np.int32).tobytes(), [1, len(value)]
    elif name == "text_input" or name in STRINGS:
        items = [value] if isinstance(value, str) else list(value)
        datatype, raw = "BYTES", b"".join(_bytes_item(s.encode("utf-8")) for s in items)
        shape = [1, len(items)]
    else:
        datatype = ("INT32" if name in INT32 else "FP32" if name in FP32 else "BOOL" if name in BOOL
                    else "UINT64" if name in UINT64 else None)
        if datatype is None:
            raise ValueError(f"unknown ensemble input {name!r}")
        raw, shape = np.array([[value]], dtype=NUMPY[datatype]).tobytes(), [1, 1]
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)


def _bytes_item(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def parse_response(message: service_pb2.ModelStreamInferResponse) -> TritonResponse:
    response = message.infer_response
    final = response.parameters["triton_final_response"].bool_param
    arrays = {out.name: _to_numpy(out, raw) for out, raw in zip(response.outputs, response.raw_output_contents)}
    text_array = arrays.get("text_output")
    text = "" if text_array is None else "".join(b.decode("utf-8", errors="replace") for b in text_array)
    return TritonResponse(
        text=text,
        final=final,
        num_input_tokens=_scalar(arrays.get("num_input_tokens")),
        num_output_tokens=_scalar(arrays.get("num_output_tokens")),
        logprobs=None if "output_log_probs" not in arrays else [float(x) for x in arrays["output_log_probs"]],
        finish_reason=_finish_reason(arrays.get("finish_reason")),
        index=_scalar(arrays.get("sequence_index")) or 0,
    )


def _to_numpy(output, raw: bytes):
    if output.datatype == "BYTES":
        items, offset = [], 0
        while offset + 4 <= len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4:offset + 4 + length])
            offset += 4 + length
        return items
    dtype = NUMPY.get(output.datatype)
    return None if dtype is None else np.frombuffer(raw, dtype=dtype).reshape(-1)


def _scalar(array) -> int | None:
    return None if array is None or len(array) == 0 else int(array[0])


def _finish_reason(array) -> str | None:
    """The engine's finish reason, should the ensemble pass it through (it does not in every version)."""
    if not array:
        return None
    value = array[0].decode("utf-8", errors="replace")
    return value or None


class TritonClient:
    """A gRPC channel to tritonserver, made inside the event loop that uses it."""

    def __init__(self, url: str):
        self.url = url
        self.channel = grpc.aio.insecure_channel(url, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def model_ready(self, model: str, timeout: float = 5.0) -> bool:
        try:
            reply = await self.stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.ready

    def call(self, request: service_pb2.ModelInferRequest) -> "TritonCall":
        return TritonCall(self.stub, request)

    async def close(self) -> None:
        await self.channel.close()


class TritonCall:
    """One request on its own stream: iterate the responses; `cancel()` cancels it on the server."""

    def __init__(self, stub, request: service_pb2.ModelInferRequest):
        self._done = asyncio.Event()
        self._call = stub.ModelStreamInfer(self._requests(request))
        self.finished = False

    async def _requests(self, request) -> AsyncIterator[service_pb2.ModelInferRequest]:
        yield request
        await self._done.wait()

    async def responses(self) -> AsyncIterator[TritonResponse]:
        """Yields until the final response; raises OpenAIError on a server or transport error."""
        try:
            async for message in self._call:
                if message.error_message:
                    raise from_triton_message(message.error_message)
                response = parse_response(message)
                if response.final:
                    self.finished = True
                    self._done.set()
                yield response
                if response.final:
                    return
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc_error(exc) from None
        raise OpenAIError(502, "tritonserver closed the stream before the final response", "server_error")

    def cancel(self) -> None:
        """Cancels the stream, and with it the request on the server (a no-op once finished)."""
        self._done.set()
        if not self._call.done():
            self._call.cancel()


def _from_rpc_error(exc: grpc.aio.AioRpcError) -> OpenAIError:
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
        return OpenAIError(503, f"tritonserver is unavailable: {exc.details() or code.name}", "service_unavailable")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return OpenAIError(400, exc.details() or "invalid argument", "invalid_request_error")
    return from_triton_message(exc.details() or code.name)
