"""The HTTP side of ``turbolm serve``: a FastAPI app with the OpenAI endpoints over a
:class:`~.scheduler.Scheduler`.

The event loop never runs the model: a request is parsed and tokenized (in a worker thread), queued,
and the app relays the scheduler's events - as one JSON object, or as server-sent events the way
OpenAI streams (``data: {chunk}`` lines, ``data: [DONE]`` at the end). A client that goes away
cancels its request: a stream notices at once (Starlette cancels it), a plain request within
``DISCONNECT_POLL_S``. Every error is an OpenAI error object with the status that fits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..core.errors import ParameterError
from ..core.generation import context_length
from .metrics import Metrics
from .protocol import (
    Generation,
    RequestError,
    chunk,
    completion,
    error_body,
    new_id,
    parse_body,
    parse_generation,
    usage_chunk,
)
from .scheduler import Failed, Finished, Job, QueueFull, Scheduler, ShuttingDown, Text, check_limits

log = logging.getLogger("turbolm.serving")

DISCONNECT_POLL_S = 0.5
DRAIN_TIMEOUT_S = 30.0  # at shutdown, without a request timeout: how long admitted requests may take
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 429: "rate_limit_error", 500: "server_error",
               503: "service_unavailable_error"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "server_error"), param, code), status,
                        headers=headers)


def create_app(model, tokenizer, decoder=None, *, model_name: str | None = None, api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64, request_timeout: float | None = None) -> FastAPI:
    """The server's app. ``decoder``: a speculative decoder for requests that run alone (see
    :class:`~.scheduler.Scheduler`); ``model_name``: the id clients name (default: the model's
    directory or file name); ``api_key``: required as ``Authorization: Bearer`` on /v1 routes;
    ``request_timeout``: seconds a request may take from arrival to its last token. The scheduler
    starts and stops with the app's lifespan (stopping lets admitted requests finish).

    The scheduler's thread runs the model: set the model up (load, ``build_decoder``, pruner) in
    :func:`turbolm.core.machine.in_passing_thread`, as ``turbolm serve`` does, or every forward
    may run up to ~1.6x slower (OpenMP's workers of two threads share the CPUs; see there)."""
    check_limits(max_batch, max_queue, request_timeout)
    if api_key is not None and not api_key:
        raise ParameterError("{} must not be empty", "api_key")
    name = model_name or _default_name(model)
    scheduler = Scheduler(model, tokenizer, decoder, max_batch=max_batch, max_queue=max_queue)
    metrics = Metrics(name, lambda: scheduler.running, lambda: scheduler.waiting)
    scheduler.metrics = metrics
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, request_timeout or DRAIN_TIMEOUT_S)

    app = FastAPI(title="turbolm", version=__version__, lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.model_name = scheduler, metrics, name

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return error_response(e.status, str(e), e.param, e.code, headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, e: ClientDisconnect):  # hung up while sending its request: nobody to answer
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.error("turbolm: error in %s", request.url.path, exc_info=e)
        return error_response(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise RequestError("invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", status=401)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "turbolm",
                                            "max_model_len": context_length(model, tokenizer)}]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, "chat")

    @v1.post("/completions")
    async def completions(request: Request):
        return await _generate(request, "completion")

    async def _generate(request: Request, kind: str):
        body = parse_body(await request.body())
        gen = await asyncio.to_thread(parse_generation, body, kind, model, tokenizer, name)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(gen.prompt, gen.max_new_tokens, gen.sampling, gen.stop, stream=gen.stream, timeout=request_timeout,
                  emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            scheduler.submit(job)
        except QueueFull as e:
            metrics.rejected_request("queue_full")
            raise RequestError(str(e), code="queue_full", status=429) from None
        except ShuttingDown as e:
            metrics.rejected_request("shutting_down")
            raise RequestError(str(e), code="shutting_down", status=503) from None
        if gen.stream:
            return StreamingResponse(_stream(job, events, gen, new_id(kind)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        event = await _outcome(job, events, request)
        if event is None:  # the client went away
            return Response(status_code=499)
        if isinstance(event, Failed):
            return error_response(event.status, event.message, code=event.code)
        return completion(kind, new_id(kind), name, event.text, event.finish_reason, event.prompt_tokens,
                          event.completion_tokens)

    async def _outcome(job: Job, events: asyncio.Queue, request: Request) -> Finished | Failed | None:
        """The request's last event (the only one without ``stream``); None (and the request
        cancelled) if the client disconnected."""
        try:
            while True:
                try:
                    return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None
        finally:
            job.cancel()  # a no-op once it ended; frees its place otherwise

    async def _stream(job: Job, events: asyncio.Queue, gen: Generation, ident: str):
        created, kind = int(time.time()), gen.kind

        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        def piece(**kw) -> str:
            return sse(chunk(kind, ident, name, created, include_usage=gen.include_usage, **kw))

        try:
            if kind == "chat":
                yield piece(role=True)
            while True:
                event = await events.get()
                if isinstance(event, Text):
                    yield piece(text=event.text)
                elif isinstance(event, Finished):
                    yield piece(finish_reason=event.finish_reason)
                    if gen.include_usage:
                        yield sse(usage_chunk(kind, ident, name, created, event.prompt_tokens, event.completion_tokens))
                    break
                elif isinstance(event, Failed):
                    yield sse(error_body(event.message, ERROR_TYPES.get(event.status, "server_error"), None, event.code))
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when Starlette cancels the stream because the client went away
            job.cancel()

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return error_response(503, "the server is shutting down", code="shutting_down")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _default_name(model) -> str:
    source = getattr(model, "turbolm_source", None)
    return source.name if source is not None else type(model).__name__
