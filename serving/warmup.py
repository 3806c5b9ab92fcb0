"""Warm-up: every shape bucket of the engine step (serving/buckets.py) compiled, or loaded from disk
(serving/aot.py), at every EP capacity level a step can reach, so serving never compiles.

Blocking (`Warmup.run(background=False)`, the library's and the tests' default): everything before
returning. Background (the server): only the cover-all shape of each step kind (most rows, longest
chunk, widest page table) at the last EP capacity level before returning -- they hold any batch,
and the last level cannot overflow, so the engine serves at once from that level, padding what it
runs up to a ready shape (Buckets.fit), and steps down once a lower level's cover-all shapes are
ready -- and the other programs on a thread, in `Buckets.plan`'s order (the lower levels' cover-all
shapes, then small shapes first, each at the last level before the first, so an overflow re-run
always finds its program). The engine thread never compiles: it runs what is ready.

The warm-up thread lowers and compiles on jax.ShapeDtypeStructs of the step's arguments (the engine
thread donates the real pool, loads and penalty table to every step) and one compile at a time,
leaving the other core to serving. A raised level's programs are only saved (when saved steps are
on): a step that overflows loads them, as after a blocking warm-up.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import jax
import numpy as np

from serving.aot import trim_heap
from serving.sampling import sampling_arrays

log = logging.getLogger("serving.warmup")


def _spec(x):
    """A device array as its shape, dtype and sharding (what lowering reads); host arrays as they are."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x


class Warmup:
    def __init__(self, runner, kinds: tuple[str, ...]):
        self.runner, self.kinds = runner, kinds
        self.total = self.ready = 0  # (level, shape) programs, and how many run without compiling
        self.compiled = self.loaded = 0  # programs the warm-up thread compiled, loaded
        self.error: str | None = None
        self.began = self.finished = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self, background: bool) -> int:
        """Warms up (see the module docstring); returns the compilations this call took."""
        runner, buckets = self.runner, self.runner.buckets
        before, self.began = runner.compilations, time.perf_counter()
        first, rest = buckets.plan(self.kinds)  # (level, shape) programs
        if not background:
            first, rest = first + rest, []
        self.total, self.ready = len(first) + len(rest), len(first)
        level = None if runner.net.ep is None else runner.net.ep.level
        # the level served from: the current one, or (background) the last, whose programs are ready first
        serve = level if level is None or not rest else max(lvl for lvl, _ in first)
        levels = [None] if level is None else sorted(range(len(runner.net.ep.capacity_factors)),
                                                     key=lambda lvl: (lvl == serve, -lvl))
        steps = {}  # level -> (whether only saved, not loaded; its step, {shape: the call's specs}): the thread's
        # the served level last, the others from the highest: each step down releases the level left
        for lvl in levels:
            if lvl is not None:
                runner._set_level(lvl)
            step, raised, at = runner._step, lvl != serve, lvl or 0
            batches = {shape: self._arrays(shape) for l, shape in first if l == at}
            calls = {shape: runner._call(shape[0], arrays) for shape, arrays in batches.items()}
            if raised and step.saves:  # a raised level: saved is enough, a step that overflows loads it
                step.prepare(list(calls.values()), load=False)
            elif calls:
                if step.saves or background:
                    step.prepare(list(calls.values()))  # saved programs loaded in parallel, the rest compiled
                if not background:  # (else not run now: serving is waiting for them)
                    for shape, arrays in batches.items():
                        out = runner.dispatch(shape[0], arrays)
                    jax.block_until_ready(out)
            steps[at] = (at > 0 and step.saves, step, {shape: jax.tree.map(
                _spec, runner._call(shape[0], self._arrays(shape))) for l, shape in rest if l == at})
        runner.penalties.warm_up()
        runner.inputs.warm_up()
        runner.inputs.reset(runner.mesh)  # (no padding step's flag reaches the first real step)
        runner.warm_copies()
        jax.block_until_ready(runner.pool)
        trim_heap()  # what compiling and loading left free goes back to the OS
        compiled = runner.compilations - before
        if rest:  # batches run on the ready programs until `start`'s thread has made the rest ready
            buckets.ready = frozenset(first)
            self._thread = threading.Thread(target=self._background, args=(rest, steps), name="warm-up", daemon=True)
        else:
            self.finished = time.perf_counter()
        return compiled

    def start(self) -> None:
        """Starts the warm-up thread, if `run` left shapes to it."""
        if self._thread is not None and not self._thread.is_alive() and not self.done:
            self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the warm-up thread; True once every shape is ready."""
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        return self.done

    def _arrays(self, shape) -> tuple:
        """An all-padding batch of this shape (it writes nothing)."""
        kind, rows, width, blocks = shape
        B, dump = rows * self.runner.ranks, self.runner.inputs.dump  # (the input batch's row no request holds)
        return (blocks, np.full(B, dump, np.int32), np.zeros((B, width), np.int32), np.full((B, width), -1, np.int32),
                np.zeros(B, np.int32), np.zeros(B, np.int32), np.full((B, width), -1, np.int32),
                np.full((B, 2), (-1, dump), np.int32),
                sampling_arrays([None] * B, [0] * B, [0] * B, [None] * B, self.runner.penalties.slots,
                                self.runner._mask(B, None)))

    def _background(self, rest, steps) -> None:
        buckets, started = self.runner.buckets, time.perf_counter()
        say(f"warm-up: serving; {len(rest)} more programs compile in the background")
        try:
            for done, (lvl, shape) in enumerate(rest, 1):
                if self._stop.is_set():
                    return
                saved_only, step, specs = steps[lvl]
                c, n, held = step.compiles, step.loads, len(step.compiled)
                step.prepare([specs[shape]], load=not saved_only, threads=1)
                self.compiled += step.compiles - c
                self.loaded += step.loads - n
                if saved_only and step is not self.runner._step and len(step.compiled) > held:
                    step.drop([specs[shape]])  # saved: loaded again if a step overflows to this level
                buckets.ready = buckets.ready | {(lvl, shape)}
                self.ready += 1
                if done == len(rest) or done % max(1, len(rest) // 10) == 0:
                    spent = time.perf_counter() - started
                    say(f"warm-up: {self.ready} of {self.total} programs ready ({self.compiled} compiled, "
                        f"{self.loaded} loaded in the background in {spent:.0f}s)"
                        + (f", about {spent / done * (len(rest) - done):.0f}s left" if done < len(rest) else ""))
            buckets.ready = None  # every program: batches run their own bucket again
            self.finished = time.perf_counter()
            trim_heap()
        except Exception as e:  # noqa: BLE001 - serving goes on with the programs that are ready
            self.error = f"{type(e).__name__}: {e}"
            log.exception("background warm-up failed; serving goes on with the %d programs ready", self.ready)

    def stop(self) -> None:
        """Stops the warm-up thread after its current program (a resize: the shapes are the old mesh's)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()

    @property
    def done(self) -> bool:
        return self.finished is not None

    def progress(self) -> dict:
        """For /health and /metrics: programs ready of all, and those the warm-up thread made."""
        return {"done": self.done, "programs_ready": self.ready, "programs": self.total,
                "background_compiled": self.compiled, "background_loaded": self.loaded,
                "seconds": round((self.finished or time.perf_counter()) - self.began, 1), "error": self.error}


def say(line: str) -> None:
    """Warm-up progress, on stderr beside the server's other start-up lines."""
    print(f"[server] {line}", file=sys.stderr, flush=True)
