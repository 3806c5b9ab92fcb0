"""The engine thread: the one thread that touches the engine (docs/SERVER.md, "Threading design").

The engine is not thread-safe (plain Python scheduler state; the KV pool and the penalty table are
donated to every step), so HTTP handlers never call it: they put submissions, aborts and calls in
`inbox`; this thread takes all of them between steps (so concurrent requests join one continuous
batch), runs `engine.step()` and hands each request's new tokens to its sink.

Over a multi-process job (serving/multihost.py) this thread is process 0's: before each step it
publishes the requests it added and aborted since the last one, which the other processes apply
before running the same step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

from serving.metrics import ServerMetrics
from serving.sampling import SamplingParams

log = logging.getLogger("serving.server")


@dataclasses.dataclass
class Update:
    """What the engine thread tells a handler about one of its requests."""
    request_id: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "error" once done
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (known from the first update)
    error: str | None = None
    logprobs: list | None = None  # per token: (logprob, [(id, logprob)]) when the request asked


@dataclasses.dataclass
class _Live:
    sink: Callable[[Update], None]
    arrival: float
    prompt_len: int
    first_at: float | None = None
    tokens: int = 0


class EngineWorker:
    """The one thread that touches the engine. Everything else talks to it through `inbox`."""

    def __init__(self, engine, metrics: ServerMetrics | None = None, shared=None):
        """shared: a serving.multihost.Shared that carries each step's inputs to the other processes."""
        self.engine = engine
        self.metrics = metrics
        self.shared = shared
        self.ops: list = []  # inputs applied since the last publish (multi-process only)
        self.fault: str | None = None  # why this thread stopped on its own (a multi-process step failed)
        self.published = 0
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
            self.fault = self.fault or "the engine thread died"
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
                    self._publish(step=False, stop=True)
                    return
                self._handle(msg)
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    msg = None
            wait = None
            if self.shared is not None and (self.ops or not engine.idle):
                self._publish(step=not engine.idle)
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
                if self.shared is not None:  # the processes may no longer agree: stop (serving/multihost.watch)
                    self.fault = f"engine step failed on process 0: {type(e).__name__}: {e}"
                    with self._lock:
                        self._stopping = True
                    self._fail_all(self.fault, drain=True)
                    return
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
                    if self.shared is not None:  # (a refused one too: the others refuse it by the same check)
                        self.ops.append(("add", rid, ids, params))
                    self.engine.add_request(ids, params, request_id=rid)
                    added.append(rid)
                    self.live[rid] = _Live(sink, arrival, len(ids))
            except Exception as e:  # noqa: BLE001 - ValueError: a bad request; the rest reach the handler too
                for rid in added:
                    self.live.pop(rid, None)
                    self._abort(rid)
                fut.set_exception(e)
            else:
                fut.set_result(None)
        elif kind == "abort":
            for rid in msg[1]:
                if self.live.pop(rid, None) is not None:
                    self._abort(rid)
                    if self.metrics:
                        self.metrics.finished.labels(reason=msg[2]).inc()
        elif kind == "call":
            _, fn, fut = msg
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001
                    fut.set_exception(e)

    def _abort(self, rid: str) -> None:
        if self.shared is not None:
            self.ops.append(("abort", rid))
        self.engine.abort(rid)

    def _publish(self, step: bool, stop: bool = False) -> None:
        """Multi-process: the inputs since the last publish, to every other process (serving/multihost.py)."""
        if self.shared is None:
            return
        from serving.multihost import StepInputs
        ops, self.ops = self.ops, []
        self.shared.agree(lambda: StepInputs(ops, step, stop))
        self.published += 1

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
                        req.cached, logprobs=event.logprobs)
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
                self._abort(rid)
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
