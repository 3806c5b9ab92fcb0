"""The HTTP side: routes, streaming, and the edge every request crosses first (docs/SERVER.md).

Handlers only translate. A generation handler reads the body (up to `max_body_bytes`: 413 past
it), hands it to a worker thread that parses, validates and tokenizes it (`Protocol.prepare`: the
event loop never runs anything that grows with the body), submits the requests to the engine
thread (`EngineWorker`) and awaits their updates on an asyncio.Queue.

`Edge`, the outermost ASGI layer, gives every response an X-Request-Id, checks API keys on /v1/*,
counts requests per endpoint and status, and turns an exception that escaped everything else into
OpenAI's error JSON without closing the client's keep-alive connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from serving.metrics import ServerMetrics, engine_snapshot
from serving.server.errors import ApiError
from serving.server.output import Call, Choice
from serving.server.protocol import Options, Protocol
from serving.server.tokenize import Tokenization
from serving.server.worker import EngineWorker

log = logging.getLogger("serving.server")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
             "/metrics")
DEFAULT_MAX_BODY_BYTES = 32 * 2 ** 20  # a 128k-token prompt as token ids is ~1 MB of JSON
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # a client's X-Request-Id is echoed only if it is this


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Server:
    """Holds the LLM, the engine thread and the metrics; `app` is the ASGI application."""

    def __init__(self, llm, served_names: list[str], default_max_tokens: int = 16, aliases=(),
                 api_keys=(), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, options: Options = Options(),
                 shared=None):
        """shared: over a multi-process job, what carries each step's inputs to the other processes
        (serving/multihost.py); this server is then process 0's."""
        self.llm, self.engine, self.tokenizer = llm, llm.engine, llm.tokenizer
        self.served_names = list(served_names)
        self.model_name = self.served_names[0]  # what responses report
        cfg = self.engine.net.config
        self.protocol = Protocol(self.tokenizer, self.engine.context_len, cfg.vocab_size, cfg.bos_token_id,
                                 self.served_names, aliases, default_max_tokens, self.engine.grammars, options)
        self.tokenization = Tokenization(self.protocol)
        self.api_keys = [k.encode() for k in api_keys if k]
        self.max_body_bytes = max_body_bytes
        self.eos = tuple(self.engine.net.config.eos_token_ids)
        self.metrics = ServerMetrics()
        self.worker = EngineWorker(self.engine, self.metrics, shared)
        self.fault: str | None = None  # a process of the job is gone (serving/multihost.watch): /health fails
        # parsing and tokenizing: off the event loop, a few at a time
        self.parsers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="parse")
        self.started = int(time.time())
        self.snapshot_timeout = 2.0  # seconds a scrape waits for the engine thread
        self._last_snapshot: dict | None = None
        self.app = Edge(self._build_app(), self)

    # -- generation --
    async def _body(self, request) -> bytes:
        """The body, or 413 past max_body_bytes (the rest is read and dropped: the connection stays usable)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        chunks, size = [], 0
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        try:
            async for chunk in request.stream():
                size += len(chunk)
                too_big = too_big or size > limit
                if not too_big:
                    chunks.append(chunk)
        except ClientDisconnect:  # gone before its body arrived: nobody to answer
            raise ApiError(499, "client closed the request") from None
        if too_big:
            raise ApiError(413, f"the request body ({declared or size} bytes) is larger than this server's limit of "
                           f"{limit} bytes (--max-request-body-bytes)", code="request_too_large")
        return b"".join(chunks)

    async def _generate(self, request, chat: bool):
        arrival = time.perf_counter()
        raw = await self._body(request)
        prep = await asyncio.get_running_loop().run_in_executor(self.parsers, self.protocol.prepare, raw, chat)
        call = Call(self.worker, request.scope["state"]["request_id"], prep, self.tokenizer, self.eos)
        try:
            await call.submit(arrival)
        except BaseException:
            call.cancel()
            raise
        if prep.stream:
            return self._stream(call, chat)
        return await self._complete(request, call, chat)

    async def _complete(self, request, call: Call, chat: bool):
        try:
            while call.live:
                try:
                    update = await asyncio.wait_for(call.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        call.cancel()
                        return JSONResponse(ApiError(499, "client closed the request").body(), status_code=499)
                    continue
                call.apply(update)
                if update.error:
                    raise ApiError(500, update.error, code="engine_error", type="server_error")
        finally:
            call.cancel()
        choices = []
        for c in call.choices:
            item: dict = {"index": c.index}
            if chat:
                item["message"] = call.message(c)
            else:
                item["text"] = c.text
            item.update(logprobs=call.logprobs(c, c.logprobs), finish_reason=call.finish(c), stop_reason=c.stop_reason)
            if call.prep.return_token_ids:
                item["token_ids"] = c.token_ids
            choices.append(item)
        out = {"id": call.id, "object": "chat.completion" if chat else "text_completion", "created": call.created,
               "model": self.model_name, "choices": choices, "usage": call.usage()}
        if call.prep.return_token_ids:
            out["prompt_token_ids"] = call.prep.prompts
        return JSONResponse(out)

    def _stream(self, call: Call, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        tokens_too = call.prep.return_token_ids

        def chunk(choices: list[dict]) -> dict:
            out = {"id": call.id, "object": kind, "created": call.created, "model": self.model_name,
                   "choices": choices}
            if call.prep.continuous_usage and choices:
                out["usage"] = call.usage()
            return out

        def piece(c: Choice, text: str, tokens: list[int], logprobs: list, first: bool = False) -> dict:
            item: dict = {"index": c.index}
            if chat:
                item["delta"] = {"role": "assistant", "content": ""} if first else call.chat_delta(c, text)
            else:
                item["text"] = text
            item.update(logprobs=None if first else call.logprobs(c, logprobs),
                        finish_reason=None if first else call.finish(c),
                        stop_reason=None if first else c.stop_reason)
            if tokens_too:
                item["token_ids"] = tokens
            return item

        async def events():
            try:
                if chat:
                    yield _sse(chunk([piece(c, "", [], [], first=True) for c in call.choices]))
                while call.live:
                    update = await call.queue.get()
                    c = call.apply(update)
                    if update.error:
                        yield _sse(ApiError(500, update.error, code="engine_error", type="server_error").body())
                        break
                    if c is None:
                        continue
                    text, tokens, logprobs = c.delta()
                    if text or tokens or c.finish_reason:
                        yield _sse(chunk([piece(c, text, tokens, logprobs)]))
                if call.prep.include_usage:
                    yield _sse({**chunk([]), "usage": call.usage()})
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects: starlette cancels this generator
                call.cancel()

        # the background task runs after the response even if the generator never started
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(call.cancel))

    async def _snapshot(self) -> dict | None:
        """A fresh engine snapshot; the last one if the engine thread is busy for long (a compilation)
        or gone, so a scrape never hangs."""
        try:
            fut = asyncio.wrap_future(self.worker.call(engine_snapshot))
            self._last_snapshot = await asyncio.wait_for(asyncio.shield(fut), timeout=self.snapshot_timeout)
        except (asyncio.TimeoutError, RuntimeError):
            pass
        return self._last_snapshot

    # -- routes --
    def _build_app(self):
        @asynccontextmanager
        async def lifespan(app):
            self.worker.start()
            try:
                yield
            finally:
                await asyncio.to_thread(self.worker.stop)
                self.parsers.shutdown(wait=False, cancel_futures=True)

        app = FastAPI(title="jaxseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.state.server = self

        @app.exception_handler(ApiError)
        async def api_error(request, exc: ApiError):
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(HTTPException)
        async def http_error(request, exc: HTTPException):
            return JSONResponse(ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)).body(),
                                status_code=exc.status_code, headers=getattr(exc, "headers", None))

        @app.exception_handler(RequestValidationError)
        async def validation_error(request, exc):
            return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._generate(request, chat=True)

        def card(name: str) -> dict:
            return {"id": name, "object": "model", "created": self.started, "owned_by": "jaxseek",
                    "root": self.served_names[0], "max_model_len": self.engine.context_len}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [card(n) for n in self.served_names]}

        @app.get("/v1/models/{model:path}")
        async def model(model: str):
            if model not in self.protocol.accepted:
                raise ApiError(404, f"The model '{model}' does not exist", "model", "model_not_found")
            return card(model)

        @app.post("/tokenize")
        async def tokenize(request: Request):
            raw = await self._body(request)
            return await asyncio.get_running_loop().run_in_executor(self.parsers, self.tokenization.tokenize, raw)

        @app.post("/detokenize")
        async def detokenize(request: Request):
            raw = await self._body(request)
            return await asyncio.get_running_loop().run_in_executor(self.parsers, self.tokenization.detokenize, raw)

        @app.get("/health")
        async def health():
            if self.fault:
                return JSONResponse({"status": self.fault}, status_code=503)
            if not self.worker.alive:
                return JSONResponse({"status": "engine thread not running"}, status_code=503)
            warming = getattr(getattr(self.engine, "runner", None), "warming", None)  # (while under way)
            return {"status": "ok", **({"warmup": warming.progress()} if warming and not warming.done else {})}

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(await self._snapshot()), media_type=CONTENT_TYPE_LATEST)

        return app


class Edge:
    """Outermost ASGI layer: X-Request-Id, API keys on /v1/*, request counting, last-resort errors."""

    def __init__(self, app, server: Server):
        self.inner, self.server = app, server

    def __getattr__(self, name):  # app.state, app.routes, ... of the FastAPI app
        return getattr(self.inner, name)

    def _authorized(self, scope) -> bool:
        if not self.server.api_keys or not scope["path"].startswith("/v1") or scope["method"] == "OPTIONS":
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        ok = False
        for key in self.server.api_keys:  # every key compared in constant time, none skipped
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def edge_send(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
                self.server.metrics.http_requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        try:
            if not self._authorized(scope):
                await _drain(receive)
                error = ApiError(401, "Incorrect or missing API key (send it as 'Authorization: Bearer KEY')",
                                 code="invalid_api_key", type="authentication_error")
                return await JSONResponse(error.body(), status_code=401)(scope, receive, edge_send)
            await self.inner(scope, receive, edge_send)
        except Exception as exc:  # noqa: BLE001 - answered here, never re-raised: uvicorn would close the connection
            log.exception("internal error")
            if not started:
                error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error",
                                 type="server_error")
                await JSONResponse(error.body(), status_code=500)(scope, receive, edge_send)


async def _drain(receive) -> None:
    """Reads (and drops) the request body, so the connection can carry the next request."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def create_app(llm, model_name: str | list[str] | None = None, default_max_tokens: int = 16, *, aliases=(),
               api_keys=(), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, options: Options = Options()):
    """The ASGI app serving `llm` (its `.state.server` is the Server). model_name: the name (or
    names) clients send as `model`, the first reported in responses (default "jaxseek"); aliases:
    more names accepted but not listed; options: parsers, chat template, generation defaults."""
    names = [model_name] if isinstance(model_name, str) else list(model_name or ["jaxseek"])
    return Server(llm, names, default_max_tokens, aliases, api_keys, max_body_bytes, options).app
