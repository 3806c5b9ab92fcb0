"""An OpenAI-compatible HTTP server over the engine (docs/SERVER.md).

    python -m serving.server --model DIR [--deployment F] [--host 127.0.0.1 --port 8000]

POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events),
GET /v1/models, GET /health, GET /metrics (Prometheus).

Threading: the engine is not thread-safe, so ONE thread owns it (`EngineWorker`). HTTP handlers run
on uvicorn's event loop; they only translate. A handler validates and tokenizes, hands its
requests to the engine thread through a thread-safe queue, and awaits an asyncio.Queue that the
engine thread feeds with `loop.call_soon_threadsafe`. The engine thread takes every new submission
and abort between steps, so concurrent requests join the same continuous batch.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import queue
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

import jinja2
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from serving.metrics import ServerMetrics, engine_snapshot
from serving.sampling import SamplingParams

log = logging.getLogger("serving.server")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


# ---- the engine thread ---------------------------------------------------------------------------
@dataclasses.dataclass
class Update:
    """What the engine thread tells a handler about one of its requests."""
    request_id: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "error" once done
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (known from the first update)
    error: str | None = None


@dataclasses.dataclass
class _Live:
    sink: Callable[[Update], None]
    arrival: float
    prompt_len: int
    first_at: float | None = None
    tokens: int = 0


class EngineWorker:
    """The one thread that touches the engine. Everything else talks to it through `inbox`."""

    def __init__(self, engine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics
        self.inbox: queue.Queue = queue.Queue()
        self.live: dict[str, _Live] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = False
        self._lock = threading.Lock()

    # -- called from any thread --
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fails whatever is still running and ends the thread (after its current step)."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self.inbox.put(("stop",))  # the last message: _put refuses any after it
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def _put(self, msg) -> bool:
        with self._lock:  # nothing enters the inbox after "stop", so nothing is left unanswered there
            if self._stopping:
                return False
            self.inbox.put(msg)
            return True

    def submit(self, requests: list[tuple[str, list[int], SamplingParams]], sink: Callable[[Update], None],
               arrival: float) -> concurrent.futures.Future:
        """Adds the requests (all or none: the first bad one raises ValueError through the future)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._put(("submit", requests, sink, arrival, fut)):
            fut.set_exception(RuntimeError("the engine thread is not running"))
        return fut

    def abort(self, request_ids, reason: str = "abort") -> None:
        """Cancels requests; `reason` is what the finish counter records (abort: the client went away)."""
        ids = list(request_ids)
        if ids:
            self._put(("abort", ids, reason))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Runs fn(engine) in the engine thread between steps (e.g. to read statistics)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._put(("call", fn, fut)):
            fut.set_exception(RuntimeError("the engine thread is not running"))
        return fut

    # -- the engine thread --
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug in the loop itself: fail loudly rather than leave handlers waiting
            log.exception("the engine thread died")
            with self._lock:
                self._stopping = True
            self._fail_all("the engine thread died", drain=True)
            raise

    def _loop(self) -> None:
        engine = self.engine
        wait: float | None = None  # block on the inbox: None = until something arrives
        while True:
            try:
                msg = self.inbox.get(timeout=wait) if (engine.idle or wait) else self.inbox.get_nowait()
            except queue.Empty:
                msg = None
            while msg is not None:
                if msg[0] == "stop":
                    self._fail_all("the server is shutting down", drain=True)
                    return
                self._handle(msg)
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    msg = None
            wait = None
            if engine.idle:
                continue
            steps = engine.counters["prefill_steps"] + engine.counters["decode_steps"]
            try:
                events = engine.step()
            except Exception as e:  # noqa: BLE001 - a failing step must not leave handlers waiting forever
                log.exception("engine step failed")
                if self.metrics:
                    self.metrics.engine_errors.inc()
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                continue
            if engine.counters["prefill_steps"] + engine.counters["decode_steps"] == steps:
                wait = 0.005  # nothing was schedulable: do not spin, look at the inbox again soon
            now = time.perf_counter()
            for event in events:
                self._deliver(event, now)

    def _handle(self, msg) -> None:
        kind = msg[0]
        if kind == "submit":
            _, requests, sink, arrival, fut = msg
            if not fut.set_running_or_notify_cancel():
                return
            added = []
            try:
                for rid, ids, params in requests:
                    self.engine.add_request(ids, params, request_id=rid)
                    added.append(rid)
                    self.live[rid] = _Live(sink, arrival, len(ids))
            except Exception as e:  # noqa: BLE001 - ValueError: a bad request; the rest reach the handler too
                for rid in added:
                    self.live.pop(rid, None)
                    self.engine.abort(rid)
                fut.set_exception(e)
            else:
                fut.set_result(None)
        elif kind == "abort":
            for rid in msg[1]:
                if self.live.pop(rid, None) is not None:
                    self.engine.abort(rid)
                    if self.metrics:
                        self.metrics.finished.labels(reason=msg[2]).inc()
        elif kind == "call":
            _, fn, fut = msg
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001
                    fut.set_exception(e)

    def _deliver(self, event, now: float) -> None:
        req = event.request
        live = self.live.get(req.id)
        if live is None:  # aborted meanwhile
            return
        m = self.metrics
        if live.first_at is None:
            live.first_at = now
            if m:
                m.ttft.observe(now - live.arrival)
                m.prompt_cache.labels(cache="hit").inc(req.cached)
                m.prompt_cache.labels(cache="miss").inc(live.prompt_len - req.cached)
        live.tokens += len(event.new_tokens)
        update = Update(req.id, list(event.new_tokens), req.finish_reason if event.finished else None,
                        req.cached)
        if event.finished:
            del self.live[req.id]
            if m:
                m.finished.labels(reason=req.finish_reason).inc()
                m.e2e.observe(now - live.arrival)
                if live.tokens > 1:
                    m.tpot.observe((now - live.first_at) / (live.tokens - 1))
        live.sink(update)

    def _fail_all(self, message: str, drain: bool = False) -> None:
        for rid, live in list(self.live.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - the engine may be in a bad state; the handler must hear anyway
                log.exception("abort of %s failed", rid)
            if self.metrics:
                self.metrics.finished.labels(reason="error").inc()
            live.sink(Update(rid, [], "error", error=message))
        self.live.clear()
        while drain:  # submissions that will never be handled
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] in ("submit", "call") and msg[-1].set_running_or_notify_cancel():
                msg[-1].set_exception(RuntimeError(message))


# ---- errors --------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


# ---- request parsing -----------------------------------------------------------------------------
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "stream", "stream_options", "n", "best_of", "logprobs", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias", "user", "return_token_ids"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "suffix"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                 "tool_choice", "parallel_tool_calls", "metadata", "store", "service_tier"}
# OpenAI fields accepted only at the value that means "off" (anything else: 400 unsupported)
NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
           "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
           "repetition_penalty": (None, 1), "logit_bias": (None, {}), "tools": (None, []),
           "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"})}


@dataclasses.dataclass
class Parsed:
    params: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool


def _is_neutral(value, ok: tuple) -> bool:
    for v in ok:
        if v is None or isinstance(v, bool) or isinstance(value, bool):
            if value is v:
                return True
        elif isinstance(v, (int, float)) and isinstance(value, (int, float)):
            if value == v:
                return True
        elif type(value) is type(v) and value == v:
            return True
    return False


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0], "unknown_parameter")
    for name, ok in NEUTRAL.items():
        if name in body and not _is_neutral(body[name], ok):
            raise _bad(f"'{name}'={body[name]!r} is not supported by this server (only {ok[-1]!r} is)", name,
                       "unsupported")


def _parse_sampling(body: dict, default_max_tokens: int, chat: bool, vocab_size: int) -> Parsed:
    max_tokens = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = body["max_completion_tokens"]
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise _bad(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    stop = body.get("stop")
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _bad(f"stop must be a string or a list of strings, got {stop!r}", "stop")
    if any(not s for s in stops):
        raise _bad("stop strings must not be empty", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in stop_ids):
        raise _bad(f"stop_token_ids must be a list of integers, got {stop_ids!r}", "stop_token_ids")
    top_k = body.get("top_k")
    if top_k == -1:  # vLLM's "off"
        top_k = 0
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > vocab_size:
        top_k = 0  # k >= the vocabulary keeps every token (and must fit the engine's int32 array)
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed &= 0xFFFFFFFF  # OpenAI takes any 64-bit seed; the sampler's keys are 32-bit
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise _bad(f"stream_options may hold only include_usage (a boolean), got {options!r}", "stream_options")
    if options and not stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")
    for flag in ("ignore_eos", "return_token_ids"):
        if not isinstance(body.get(flag, False), bool):
            raise _bad(f"{flag} must be a boolean, got {body[flag]!r}", flag)
    raw = dict(max_tokens=max_tokens, temperature=body.get("temperature"), top_p=body.get("top_p"), top_k=top_k,
               seed=seed, stop_token_ids=tuple(stop_ids), ignore_eos=bool(body.get("ignore_eos", False)))
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # OpenAI's defaults (temperature 1: sampling)
    raw = {k: (defaults[k] if v is None and k in defaults else v) for k, v in raw.items()}
    try:
        params = SamplingParams(**raw)
    except (TypeError, ValueError) as e:
        raise _bad(str(e)) from None
    return Parsed(params, stops, stream, bool(options.get("include_usage")), bool(body.get("return_token_ids")))


# ---- turning tokens into text --------------------------------------------------------------------
class Detokenizer:
    """Incremental decoding (a window of already-decoded tokens gives the new ones their context);
    holds text back while it ends in half a UTF-8 character."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, ids: list[int], final: bool) -> str:
        self.ids.extend(ids)
        if self.tok is None:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""


class Choice:
    """One choice of a response: its tokens, its text and where string stops cut it."""

    def __init__(self, index: int, request_id: str, prompt: list[int], tokenizer, stops: tuple[str, ...]):
        self.index, self.request_id, self.prompt = index, request_id, prompt
        self.detok = Detokenizer(tokenizer)
        self.stops = stops
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.sent_tokens = 0
        self.checked = 0  # characters of text already searched for stop strings
        self.finish_reason: str | None = None
        self.cached_tokens = 0

    def feed(self, update: Update) -> bool:
        """Takes an update; returns True if a stop string ended the choice (the engine must abort it)."""
        self.token_ids += update.token_ids
        self.cached_tokens = update.cached_tokens
        self.text += self.detok.add(update.token_ids, final=update.finish_reason is not None)
        self.finish_reason = update.finish_reason
        if self.stops and self.finish_reason != "error":
            start = max(0, self.checked - self.longest_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            self.checked = len(self.text)
            if hits:
                self.text = self.text[:min(hits)]
                stopped_early = self.finish_reason is None
                self.finish_reason = "stop"
                return stopped_early
        return False

    def delta(self) -> tuple[str, list[int]]:
        """Text and tokens not streamed yet; while running, holds back a tail that may begin a stop string."""
        end = len(self.text)
        if self.finish_reason is None:
            for k in range(min(self.longest_stop - 1, end - self.sent), 0, -1):
                if any(s.startswith(self.text[end - k:]) for s in self.stops):
                    end -= k
                    break
        text = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        tokens = self.token_ids[self.sent_tokens:]
        self.sent_tokens = len(self.token_ids)
        return text, tokens


class Call:
    """One HTTP request's engine requests (one per prompt) and the queue their updates arrive on."""

    def __init__(self, worker: EngineWorker, prefix: str, prompts: list[list[int]], tokenizer, parsed: Parsed,
                 param: str = "prompt"):
        self.worker, self.parsed, self.param = worker, parsed, param
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [Choice(i, f"{self.id}-{i}", p, tokenizer, parsed.stops) for i, p in enumerate(prompts)]
        self.by_id = {c.request_id: c for c in self.choices}
        self.live: set[str] = set()
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def _sink(self, update: Update) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, update)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def submit(self, arrival: float) -> None:
        self.live = set(self.by_id)
        fut = self.worker.submit([(c.request_id, c.prompt, self.parsed.params) for c in self.choices], self._sink,
                                 arrival)
        try:
            await asyncio.wrap_future(fut)
        except ValueError as e:
            self.live.clear()
            raise _bad(_strip_request_id(str(e)), self.param,
                       "context_length_exceeded" if "does not fit the context" in str(e) else "invalid_value") \
                from None
        except RuntimeError as e:
            self.live.clear()
            raise ApiError(503, str(e), code="engine_unavailable", type="server_error") from None

    def apply(self, update: Update) -> Choice | None:
        """Applies one update; returns its choice (None if the update is stale)."""
        choice = self.by_id.get(update.request_id)
        if choice is None or update.request_id not in self.live:
            return None
        if choice.feed(update):  # a stop string: the engine may stop generating it
            self.live.discard(update.request_id)
            self.worker.abort([update.request_id], reason="stop")
        if choice.finish_reason is not None:
            self.live.discard(update.request_id)
        return choice

    def cancel(self) -> None:
        """The client went away (or the handler failed): abort whatever still runs."""
        if self.live:
            self.worker.abort(self.live)
            self.live = set()

    def usage(self) -> dict:
        prompt = sum(len(c.prompt) for c in self.choices)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in self.choices)}}


def _strip_request_id(message: str) -> str:
    # the engine names its internal request id ("request cmpl-...-0: ..."); the client did not choose it
    if message.startswith("request ") and ": " in message:
        return message.split(": ", 1)[1]
    return message


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---- the app -------------------------------------------------------------------------------------
class Server:
    """Holds the LLM, the engine thread and the metrics; `app` is the FastAPI application."""

    def __init__(self, llm, model_name: str, default_max_tokens: int = 16):
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.metrics = ServerMetrics()
        self.worker = EngineWorker(self.engine, self.metrics)
        self.started = int(time.time())
        self.snapshot_timeout = 2.0  # seconds a scrape waits for the engine thread
        self._last_snapshot: dict | None = None
        self.app = self._build_app()

    # -- parsing helpers --
    async def _body(self, request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") \
                from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                           code="invalid_json")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model '{model}' does not exist (this server serves '{self.model_name}')",
                           "model", "model_not_found")
        return body

    def _text_ids(self, text: str, param: str) -> list[int]:
        if self.tokenizer is None:
            raise _bad(f"this model has no tokenizer.json: send {param} as token ids", param)
        bos = self.engine.net.config.bos_token_id
        return ([bos] if bos is not None else []) + self.tokenizer.encode(text)

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise _bad("the prompt is empty", param)
        if len(ids) >= self.engine.context_len:
            raise _bad(f"This model's maximum context length is {self.engine.context_len} tokens, and the prompt "
                       f"has {len(ids)} (at least one token must be left to generate)", param,
                       "context_length_exceeded")
        return ids

    def _prompts(self, prompt) -> list[list[int]]:
        """OpenAI's prompt forms: a string, a list of token ids, a list of strings, a list of token-id lists."""
        def one(p) -> list[int]:
            if isinstance(p, str):
                if not p:
                    raise _bad("the prompt is empty", "prompt")
                return self._check_ids(self._text_ids(p, "prompt"), "prompt")
            if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                return self._check_ids(p, "prompt")
            raise _bad("prompt must be a string, a list of token ids, or a list of either", "prompt", "invalid_type")
        if prompt is None:
            raise _bad("'prompt' is a required property", "prompt", "missing_required_parameter")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            return [one(prompt)]
        if isinstance(prompt, list) and prompt:
            return [one(p) for p in prompt]
        raise _bad("the prompt is empty" if prompt == [] else
                   "prompt must be a string, a list of token ids, or a list of either", "prompt")

    def _chat_ids(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list", "messages",
                       "missing_required_parameter" if messages is None else "invalid_value")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                       for p in content):
                    raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content",
                               "unsupported")
                content = "".join(p["text"] for p in content)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise _bad(f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
            clean.append({**m, "content": content})
        if self.tokenizer is None:
            raise _bad("chat needs the checkpoint's tokenizer.json and chat template", "messages")
        try:
            ids = self.llm.chat_prompt(clean)
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
            raise _bad(f"the chat template rejected the messages: {e}", "messages") from None
        return self._check_ids(ids, "messages")

    # -- generation --
    async def _generate(self, request, chat: bool):
        arrival = time.perf_counter()
        body = await self._body(request)
        _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
        parsed = _parse_sampling(body, self.default_max_tokens, chat, self.engine.net.config.vocab_size)
        prompts = [self._chat_ids(body.get("messages"))] if chat else self._prompts(body.get("prompt"))
        if self.tokenizer is None:
            parsed.return_token_ids = True  # no text without a tokenizer: the ids are the answer
        call = Call(self.worker, "chatcmpl" if chat else "cmpl", prompts, self.tokenizer, parsed,
                    "messages" if chat else "prompt")
        try:
            await call.submit(arrival)
        except BaseException:
            call.cancel()
            raise
        if parsed.stream:
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
                item["message"] = {"role": "assistant", "content": c.text}
            else:
                item["text"] = c.text
            item.update(logprobs=None, finish_reason=c.finish_reason)
            if call.parsed.return_token_ids:
                item["token_ids"] = c.token_ids
            choices.append(item)
        out = {"id": call.id, "object": "chat.completion" if chat else "text_completion", "created": call.created,
               "model": self.model_name, "choices": choices, "usage": call.usage()}
        if call.parsed.return_token_ids:
            out["prompt_token_ids"] = [c.prompt for c in call.choices]
        return JSONResponse(out)

    def _stream(self, call: Call, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        tokens_too = call.parsed.return_token_ids

        def chunk(choices: list[dict]) -> dict:
            return {"id": call.id, "object": kind, "created": call.created, "model": self.model_name,
                    "choices": choices}

        def piece(c: Choice, text: str, tokens: list[int], finish: str | None, first: bool = False) -> dict:
            item: dict = {"index": c.index}
            if chat:
                delta: dict = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                item["delta"] = delta
            else:
                item["text"] = text
            item.update(logprobs=None, finish_reason=finish)
            if tokens_too:
                item["token_ids"] = tokens
            return item

        async def events():
            try:
                if chat:
                    yield _sse(chunk([piece(c, "", [], None, first=True) for c in call.choices]))
                while call.live:
                    update = await call.queue.get()
                    c = call.apply(update)
                    if update.error:
                        yield _sse(ApiError(500, update.error, code="engine_error", type="server_error").body())
                        break
                    if c is None:
                        continue
                    text, tokens = c.delta()
                    if text or tokens or c.finish_reason:
                        yield _sse(chunk([piece(c, text, tokens, c.finish_reason)]))
                if call.parsed.include_usage:
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

        @app.exception_handler(Exception)
        async def internal_error(request, exc):
            log.exception("internal error")
            return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error",
                                         type="server_error").body(), status_code=500)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._generate(request, chat=True)

        def card() -> dict:
            return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "jaxseek",
                    "max_model_len": self.engine.context_len}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [card()]}

        @app.get("/v1/models/{model:path}")
        async def model(model: str):
            if model != self.model_name:
                raise ApiError(404, f"The model '{model}' does not exist", "model", "model_not_found")
            return card()

        @app.get("/health")
        async def health():
            if not self.worker.alive:
                return JSONResponse({"status": "engine thread not running"}, status_code=503)
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(await self._snapshot()), media_type=CONTENT_TYPE_LATEST)

        return _CountRequests(app, self.metrics)


class _CountRequests:
    """ASGI middleware: counts each HTTP request by endpoint and status as its response starts."""

    def __init__(self, app, metrics: ServerMetrics):
        self.inner, self.metrics = app, metrics

    def __getattr__(self, name):  # app.state, app.routes, ... of the FastAPI app
        return getattr(self.inner, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        counted = False

        async def counting_send(message):
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.metrics.http_requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        try:
            await self.inner(scope, receive, counting_send)
        finally:
            if not counted:
                self.metrics.http_requests.labels(endpoint=endpoint, status="500").inc()


def warm_up(engine) -> int:
    """Compiles every shape bucket of the engine step now (Engine.warmup), so no request waits for
    a compilation; returns the number of compilations."""
    return engine.warmup()


def create_app(llm, model_name: str | None = None, default_max_tokens: int = 16):
    """The ASGI app serving `llm` (its `.state.server` is the Server). model_name: what clients must
    send as `model` (default: the checkpoint directory's name)."""
    return Server(llm, model_name or "jaxseek", default_max_tokens).app


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.server",
                                 description="OpenAI-compatible HTTP server over the jaxseek engine.")
    ap.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--deployment", help="deployment file (default: every device present)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", help="the `model` clients send (default: the model directory's name)")
    ap.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens when a request gives none")
    ap.add_argument("--no-warmup", action="store_true", help="compile shape buckets on first use, not at startup")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[server] %(message)s")
    if args.default_max_tokens < 1:
        ap.error("--default-max-tokens must be >= 1")

    import uvicorn

    from serving.api import DEFAULT_MODEL, LLM
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    try:
        print(f"[server] loading {model_dir}...", file=sys.stderr)
        llm = LLM(model_dir, deployment=args.deployment)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_warmup:
        start = time.perf_counter()
        n = warm_up(llm.engine)
        print(f"[server] compiled {n} shape buckets in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    name = args.served_model_name or model_dir.resolve().name
    app = Server(llm, name, args.default_max_tokens).app
    print(f"[server] serving '{name}' on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
