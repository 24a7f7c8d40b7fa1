"""The web side: an ASGI application (Starlette) with OpenAI's routes and the chat page.

ASGI is Python's interface between a web server (uvicorn) and an application: the server
parses HTTP and calls ``app(scope, receive, send)`` once per request, on an asyncio event
loop. Starlette is a thin toolkit over it — routes, requests, responses, middleware — and
nothing more, which is why it was chosen over FastAPI (built on Starlette): FastAPI's gift is
validation from type hints, but its errors are not OpenAI's shape, and the checks are few
enough to read as plain code (``protocol.py``).

A request goes through::

    the API key (401)  →  the body, at most MAX_BODY_BYTES (413), JSON (400)
    →  protocol.parse_request: every field checked, the prompt tokenized (400 / 404)
    →  engine.reserve: a place in the queue (429)
    →  the reply: one JSON object, or a stream of server-sent events

**Server-sent events** (``text/event-stream``) are how OpenAI streams: the response stays
open and each piece of text is sent as it is ready, as a line ``data: {json}`` and a blank
line; ``data: [DONE]`` ends it. A browser reads them with ``fetch`` and a stream reader.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from minqwen2.errors import MinQwen2Error
from minqwen2.generate import model_defaults
from minqwen2.server.engine import Engine, Turn
from minqwen2.server.protocol import (
    MAX_BODY_BYTES,
    APIError,
    Job,
    ServedModel,
    chunk_body,
    envelope,
    logprobs_body,
    new_id,
    now,
    parse_request,
    response_body,
    usage,
)

log = logging.getLogger("minqwen2.server")

#: The chat page: one HTML file with its JavaScript inside, shipped with the package.
CHAT_PAGE = Path(__file__).resolve().parent.parent / "static" / "chat.html"


def build_app(
    model: Any,
    tokenizer: Any,
    *,
    name: str | None = None,
    fingerprint: str | None = None,
    api_key: str | None = None,
    max_queue: int = 16,
    max_tokens: int = 512,
    cors_origins: list[str] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    thread: ThreadPoolExecutor | None = None,
) -> Starlette:
    """The server for one loaded model, as an ASGI application (``uvicorn.run(app)``).

    * ``name``: the model id clients send (default: the model directory's name).
    * ``fingerprint``: ``system_fingerprint`` in every response (default: ``minqwen2-<name>``).
    * ``api_key``: when set, every ``/v1`` request needs ``Authorization: Bearer <key>``.
    * ``max_queue``: requests that may wait while one generates; beyond, 429.
    * ``max_tokens``: the reply's length when a request does not say.
    * ``cors_origins``: web origins allowed to call the API from a browser (default: none).
    * ``thread``: the ``engine.model_thread()`` the model was loaded on (needed for MLX).
    """
    if tokenizer is None:
        raise MinQwen2Error("the server needs a tokenizer (the model directory has no tokenizer.json)")
    model_dir, sampling = model_defaults(model)
    name = name or (model_dir.name if model_dir else "model")
    served = ServedModel(
        name=name,
        fingerprint=fingerprint or f"minqwen2-{name}",
        context=int(model.config.max_position_embeddings),
        vocab_size=int(model.config.vocab_size),
        sampling=sampling,
        max_tokens=max_tokens,
    )
    server = Server(Engine(model, tokenizer, max_queue, thread), served, api_key, max_body_bytes)
    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    middleware = []
    if cors_origins:  # off unless asked for: a web page elsewhere must not drive a local model
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: http_error},
        lifespan=server.lifespan,
    )
    app.state.server = server
    return app


class Server:
    """The route handlers, around the :class:`~minqwen2.server.engine.Engine`."""

    def __init__(self, engine: Engine, served: ServedModel, api_key: str | None, max_body_bytes: int) -> None:
        self.engine, self.served, self.tokenizer = engine, served, engine.tokenizer
        self.api_key, self.max_body_bytes = api_key, max_body_bytes

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Runs around the server's life: at shutdown, the model thread is stopped."""
        yield
        self.engine.close()

    # -- small routes ----------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return FileResponse(CHAT_PAGE, media_type="text/html")

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse({"status": "ok", "model": self.served.name, "busy": e.busy, "waiting": e.waiting})

    async def models(self, request: Request) -> Response:
        return await guarded(self._models, request)

    async def model(self, request: Request) -> Response:
        return await guarded(self._model, request)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.served.name, "object": "model", "created": 0, "owned_by": "minqwen2"}

    async def _models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def _model(self, request: Request) -> Response:
        self.authorize(request)
        if request.path_params["model_id"] != self.served.name:
            raise APIError(404, f"The model '{request.path_params['model_id']}' does not exist",
                           param="model", code="model_not_found")  # fmt: skip
        return JSONResponse(self._model_card())

    # -- the two generation routes ---------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await guarded(self._generate, request, "chat")

    async def completions(self, request: Request) -> Response:
        return await guarded(self._generate, request, "completion")

    async def _generate(self, request: Request, endpoint: str) -> Response:
        self.authorize(request)
        body = await self.read_json(request)
        # Off the event loop: tokenizing a long prompt takes a while.
        job = await anyio.to_thread.run_sync(self.parse, body, endpoint)
        turn = self.engine.reserve()  # 429 here, before any response has started
        if job.stream:
            return EventStream(self.events(job, turn), turn)
        try:
            return JSONResponse(await self.collect(job, turn, request))
        finally:
            turn.end()

    def parse(self, body: Any, endpoint: str) -> Job:
        try:
            return parse_request(body, endpoint, self.served, self.tokenizer)
        except (MinQwen2Error, ValueError, TypeError) as err:  # e.g. the chat template's raise_exception
            raise APIError(400, f"the request cannot be rendered: {err}") from None

    async def collect(self, job: Job, turn: Turn, request: Request) -> dict[str, Any]:
        """Generate the whole reply; the answer of a request without ``stream``."""
        await turn.wait()
        text, logprobs, last = [], [], None
        async with aclosing(self.engine.run(job, turn, request.is_disconnected)) as steps:
            async for step in steps:
                text.append(step.response.text)
                if step.logprob is not None:
                    logprobs.append(step.logprob)
                last = step
        if last is None or last.response.finish_reason is None:
            return {}  # the client left; nobody reads this
        r = last.response
        counts = usage(r.prompt_tokens, r.generation_tokens, last.cached_tokens)
        return response_body(
            job, self.served, self.tokenizer, "".join(text), r.finish_reason, logprobs, counts
        )

    async def events(self, job: Job, turn: Turn) -> AsyncIterator[str]:
        """The server-sent events of a streamed reply: one chunk per piece of text.

        The first chunk is sent once the request holds the model (its wait in the queue is
        over); pieces of text come as the detokenizer and the stop-string filter release
        them (``GenerationResponse.text``); a token that releases no text sends nothing,
        its log-probability travels with the next chunk.
        """
        head = envelope(job, new_id(job.endpoint), now(), self.served, chunk=True)
        try:
            await turn.wait()
            yield sse(chunk_body(job, head, role=True))
            pending, offset, last = [], 0, None
            async with aclosing(self.engine.run(job, turn, still_connected)) as steps:
                async for step in steps:
                    last, r = step, step.response
                    if step.logprob is not None:
                        pending.append(step.logprob)
                    if r.text:
                        lp = logprobs_body(job, self.tokenizer, pending, offset)
                        yield sse(chunk_body(job, head, text=r.text, logprobs=lp))
                        pending, offset = [], offset + len(r.text)
            r = last.response
            lp = logprobs_body(job, self.tokenizer, pending, offset) if pending else None
            yield sse(chunk_body(job, head, finish_reason=r.finish_reason, logprobs=lp))
            if job.include_usage:
                counts = usage(r.prompt_tokens, r.generation_tokens, last.cached_tokens)
                yield sse({**head, "choices": [], "usage": counts})
        except APIError as err:  # found once generating (the memory plan): an error event ends the stream
            yield sse(err.body())
        except Exception as err:  # noqa: BLE001 (a bug must not leave the client waiting)
            log.exception("generation failed")
            yield sse(internal_error(err).body())
        yield "data: [DONE]\n\n"

    # -- checks ----------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        """With ``--api-key``: ``Authorization: Bearer <key>``, compared in constant time
        (``hmac.compare_digest``), so the response time does not reveal how much matched."""
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refused past ``max_body_bytes`` without reading it all."""
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
        try:
            return json.loads(body, parse_constant=_no_constants)
        except (ValueError, RecursionError) as err:
            raise APIError(400, f"We could not parse the JSON body of your request: {err}") from None


class EventStream(StreamingResponse):
    """A server-sent-event response that always cleans up at once.

    Starlette cancels a stream whose client disconnected. The events generator may then be
    suspended at a ``yield`` and would otherwise be closed only when the garbage collector
    finds it — holding the model until then. So it is closed here, shielded from the
    cancellation, and the turn ended: the next request starts right away.
    """

    def __init__(self, events: AsyncIterator[str], turn: Turn) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.turn = turn

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.turn.end()


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def still_connected() -> bool:
    """A stream's disconnection is seen by Starlette itself (it cancels the stream)."""
    return False


async def guarded(handler: Any, request: Request, *args: Any) -> Response:
    """Run a handler; any error becomes OpenAI's error JSON (a bug: 500, and a log line)."""
    try:
        return await handler(request, *args)
    except APIError as err:
        return error_response(err)
    except Exception as err:  # noqa: BLE001 (the server keeps serving)
        log.exception("request failed")
        return error_response(internal_error(err))


def internal_error(err: Exception) -> APIError:
    return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error")


def error_response(err: APIError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (an unknown path: 404, a wrong method: 405) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
