"""The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models and /health in front of tritonserver.

Every error leaves in OpenAI's format ({"error": {"message", "type", "param", "code"}}): 400 for invalid
parameters (ours or the backend's), 404 for an unknown model or path, 413 for a body over the bound, 503 when
tritonserver is unreachable or overloaded (or too many requests are in flight here).
"""
from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import OpenAIError, invalid
from .generation import Generation, chat_generation, completion_generation, run_until_disconnect
from .protocol import ChatCompletionRequest, CompletionRequest
from .repository import ServedModel
from .triton import TritonClient

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 4 << 20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BodyLimit:
    """ASGI middleware: reads at most `limit` bytes of a request body (413 beyond), then replays it."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, scope, receive, send):
        error = OpenAIError(413, f"request body is larger than {self.limit} bytes", code="request_too_large")
        await error.response()(scope, receive, send)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, for whoever watches for it
    return replay


def create_app(models: dict[str, ServedModel], triton_url: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_in_flight: int = 0, route: str = "engine", on_shutdown=None) -> FastAPI:
    """route "engine": requests go to each ensemble's engine model as token ids (a disconnect frees the engine
    request; see repository.py); "ensemble": to the ensemble as text (tritonserver 2.51 then finishes a
    disconnected request's generation). on_shutdown runs when the app stops (uvicorn re-raises SIGTERM after
    its shutdown, so a `finally` around uvicorn.run would never run)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = TritonClient(triton_url)  # a grpc.aio channel belongs to the serving loop
        try:
            yield
        finally:
            await app.state.triton.close()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="Tritium OpenAI-compatible API", lifespan=lifespan)
    app.state.models = models
    app.state.route = route
    app.state.limiter = InFlight(max_in_flight)
    _add_error_handlers(app)
    _add_routes(app)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


class InFlight:
    """A bound on requests in flight in this frontend (0: none); over it a request gets 503 at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    @contextlib.contextmanager
    def hold(self):
        if self.limit and self.count >= self.limit:
            raise OpenAIError(503, f"{self.count} requests in flight (limit {self.limit}); retry later",
                              "service_unavailable")
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return invalid(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}").response()
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        param = ".".join(loc) or None
        return invalid(f"{param}: {message}" if param else message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return OpenAIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


def _model(app: FastAPI, name: str) -> ServedModel:
    model = app.state.models.get(name)
    if model is None:
        raise OpenAIError(404, f"the model {name!r} does not exist; available: {', '.join(app.state.models)}",
                          param="model", code="model_not_found")
    return model


def _model_card(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "tritium",
            "max_model_len": model.context_length}


def _add_routes(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(m) for m in app.state.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return _model_card(_model(app, name))

    @app.get("/health")
    async def health():
        ready = [await app.state.triton.model_ready(name) for name in app.state.models]
        if not all(ready):
            raise OpenAIError(503, "tritonserver or a model is not ready", "service_unavailable")
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = _model(app, body.model)
        if body.echo and body.logprobs is not None:
            raise invalid("echo with logprobs is not supported (no prompt log probabilities)", "echo")
        ids = _check_length(model, model.tokenizer(body.prompt)["input_ids"], "prompt")  # as preprocessing does
        ids = ids if _to_engine(app, model) else None
        with app.state.limiter.hold():
            return await _serve(completion_generation(app.state.triton, model, body, ids), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = _model(app, body.model)
        to_engine = _to_engine(app, model)
        prompt, ids = chat_prompt(model, body, strip_bos=not to_engine)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(model.context_length - len(ids), 1)
        with app.state.limiter.hold():
            generation = chat_generation(app.state.triton, model, body, prompt, max_tokens, ids if to_engine else None)
            return await _serve(generation, request)


def _to_engine(app: FastAPI, model: ServedModel) -> bool:
    return app.state.route == "engine" and model.engine is not None


def _check_length(model: ServedModel, ids: list[int], param: str) -> list[int]:
    if len(ids) >= model.context_length:
        raise OpenAIError(400, f"{param}: the prompt is {len(ids)} tokens; this model's context is "
                          f"{model.context_length} tokens", param=param, code="context_length_exceeded")
    return ids


async def _serve(generation: Generation, request: Request) -> Response:
    started = time.monotonic()
    if generation.request.stream:
        events = await generation.start_stream()
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    body = await run_until_disconnect(generation.run(), request.receive)
    if body is None:
        log.info("client disconnected after %.1f s: request %s cancelled", time.monotonic() - started, generation.id)
        return Response(status_code=499)
    return JSONResponse(body)


def chat_prompt(model: ServedModel, body: ChatCompletionRequest, strip_bos: bool) -> tuple[str, list[int]]:
    """The conversation through the model's chat template and its token ids (tokenized as preprocessing does
    with the template: no special tokens added); a template error is a 400."""
    if not model.has_chat_template:
        raise invalid(f"the model {model.name!r} has no chat template; use /v1/completions", "messages")
    tokenizer = model.tokenizer
    try:
        prompt = tokenizer.apply_chat_template(body.chat_messages(), tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja's TemplateError (e.g. "roles must alternate") and the like
        raise invalid(f"messages: the chat template refused them: {exc}", "messages") from None
    bos = getattr(tokenizer, "bos_token", None)
    if strip_bos and bos and prompt.startswith(bos) and _adds_bos(tokenizer):
        prompt = prompt[len(bos):]  # sent as text, preprocessing adds special tokens: no second BOS
    ids = _check_length(model, tokenizer(prompt, add_special_tokens=False)["input_ids"], "messages")
    return prompt, ids


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("")["input_ids"]
    return bool(ids) and ids[0] == getattr(tokenizer, "bos_token_id", None)
