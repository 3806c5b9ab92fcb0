"""The engine step's shape buckets: the one policy that decides which programs exist, which one a
batch runs, and in what order warm-up makes them ready.

A step program is specific to its *shape* (kind, rows per rank, tokens per row, page-table blocks)
and its EP capacity level:
- rows per rank: `serving.prefill_rows` / `serving.decode_batch`;
- tokens per row: prefill chunk lengths `serving.prefill_tokens`; decode 1 + k (the last token and
  the MTP drafts);
- page-table blocks: powers of two up to a row's most blocks (the context, capped by the pool);
  a prefill chunk in a width bucket holds more tokens than the bucket below it, so its smallest
  page tables never occur.
A batch runs the smallest shape holding it. Padding is harmless: padded rows and tokens have
position -1 (nothing written, nothing sampled) and page-table entries past a row's blocks are never
read, so any larger shape computes the same tokens.

At a raised EP capacity level (a step re-run after its rows overflowed the level's expert buckets,
and the window of steps after it: serving/runner.py CapacityWindow) the page table is always the widest: a raised level is
rare and short-lived, and one width there instead of one per context bucket makes about half of
all programs unnecessary (126 -> 62 on cpu8). An overflowed step's table is widened (`widen`: zero
columns, never read) before it re-runs.

Readiness (background warm-up, serving/warmup.py): a program is a (level, shape) pair. While some
are still compiling, `fit` picks the smallest shape that holds the batch and is *usable*: ready at
the current level, and its raised shape ready at the last level (which cannot overflow), so an
overflow always has somewhere to re-run (`retry_level`: the next level whose program for it and
whose cover-all shapes are ready, else the last). The largest shape of each kind (the "cover-all":
most rows, longest chunk, widest page table) holds every batch of that kind; ready at the last
level, it lets the engine serve anything without compiling (at the worst-case EP capacity, until
a window of steps brings the level down to one whose cover-all shapes are ready: `down_level`).
"""

from __future__ import annotations

import math

import numpy as np

Shape = tuple[str, int, int, int]  # (kind, rows per rank, tokens per row, page-table blocks)


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket holding n (sizes sorted); n must not exceed the largest."""
    for s in sizes:
        if n <= s:
            return s
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


def context_buckets(max_blocks: int) -> tuple[int, ...]:
    """Page-table widths: powers of two up to max_blocks (which is one too)."""
    return tuple(sorted({min(2 ** i, max_blocks) for i in range(math.ceil(math.log2(max_blocks)) + 1)}))


class Buckets:
    def __init__(self, serving, drafts: int, max_blocks: int, levels: int = 1):
        """serving: sharding.deployment.ServingConfig; drafts: k, MTP draft tokens per decode row;
        max_blocks: the most KV blocks a row's page table holds; levels: EP capacity levels."""
        self.serving, self.drafts, self.max_blocks, self.levels = serving, drafts, max_blocks, levels
        self.context = context_buckets(max_blocks)
        self.covers: list[Shape] = []  # the cover-all shapes of the kinds warmed up
        # (level, shape) programs a batch may run while warm-up compiles the rest in the background;
        # None: any (all warmed up, or none: compiled on first use). Rebound, never mutated: the
        # engine thread reads it while the warm-up thread grows it.
        self.ready: frozenset[tuple[int, Shape]] | None = None

    def exact(self, kind: str, per_rank: int, width: int, need: int, level: int = 0) -> Shape:
        """The smallest shape holding `per_rank` rows of up to `width` new tokens needing `need` blocks
        at this EP capacity level (raised levels: the widest page table)."""
        if kind == "prefill":
            rows, width = bucket(per_rank, self.serving.prefill_rows), bucket(width, self.serving.prefill_tokens)
        else:
            rows, width = bucket(per_rank, self.serving.decode_batch), 1 + self.drafts
        return kind, rows, width, self.context[-1] if level else bucket(min(need, self.max_blocks), self.context)

    def raised(self, shape: Shape) -> Shape:
        """The shape a batch of this shape runs at a raised capacity level."""
        return (*shape[:3], self.context[-1])

    def widen(self, arrays: tuple) -> tuple:
        """A packed batch (its page-table width first) with the widest page table, to re-run at a
        raised level (the rows' page tables are on the device: serving/input_batch.py)."""
        return (self.context[-1], *arrays[1:])

    def fit(self, kind: str, per_rank: int, width: int, need: int, level: int = 0) -> Shape:
        """The shape this batch runs: the smallest holding it, or while warm-up is under way the
        smallest usable one that does (fewest padded tokens, then the narrowest page table)."""
        shape, ready = self.exact(kind, per_rank, width, need, level), self.ready
        if ready is None or self._usable(level, shape, ready):
            return shape
        holds = [s for lvl, s in ready if lvl == level and s[0] == kind and self._usable(level, s, ready)
                 and all(a >= b for a, b in zip(s[1:], shape[1:]))]
        if not holds:  # (warm-up makes the cover-all shapes ready first: only a bug lands here)
            raise RuntimeError(f"no compiled {kind} program at EP capacity level {level} holds {shape[1:]} yet")
        return min(holds, key=lambda s: (s[1] * s[2], s[3]))

    def _usable(self, level: int, shape: Shape, ready) -> bool:
        return (level, shape) in ready and (self.levels - 1, self.raised(shape)) in ready

    def _covered(self, level: int, ready) -> bool:
        return all((level, c) in ready for c in self.covers)

    def retry_level(self, shape: Shape, level: int) -> int:
        """The level a step of this shape that overflowed `level` re-runs at: the next, or while warm-up
        is under way the next where its program and the cover-all shapes are ready (the last's are)."""
        ready = self.ready
        if ready is None:
            return level + 1
        return next((lvl for lvl in range(level + 1, self.levels - 1)
                     if (lvl, self.raised(shape)) in ready and self._covered(lvl, ready)), self.levels - 1)

    def down_level(self, level: int) -> int:
        """The level a window of steps without overflow brings `level` down to: the one below, or while
        warm-up is under way the nearest below whose cover-all shapes are ready (none: `level`)."""
        ready = self.ready
        if ready is None:
            return level - 1
        return next((lvl for lvl in range(level - 1, -1, -1) if self._covered(lvl, ready)), level)

    def plan(self, kinds: tuple[str, ...]) -> tuple[list, list]:
        """Warm-up order, as (level, shape) programs: (first, rest). first: the cover-all shapes at the
        last level (enough to serve anything: the engine starts there, where nothing overflows, and
        steps down once a lower level's are ready). rest: the other levels' cover-all shapes, the
        first level's first, then each shape (`shapes`) at the last level, the first, and between."""
        self.covers, last = self.first(kinds), self.levels - 1
        first = [(last, c) for c in self.covers]
        rest = [(lvl, c) for lvl in range(last) for c in self.covers]
        for s in self.shapes(kinds)[len(self.covers):]:
            rest += [(lvl, s if lvl == 0 else self.raised(s)) for lvl in [last, 0, *range(1, last)]]
        return first, [p for p in dict.fromkeys(rest) if p not in first]

    def shapes(self, kinds: tuple[str, ...]) -> list[Shape]:
        """Every shape these step kinds run, in warm-up order: the cover-all shape of each kind first
        (`first(kinds)`), then by page-table width and tokens per step, small ones first (what a
        first request runs: one row, a short context)."""
        s = self.serving
        every = [("prefill", r, t, b) for r in s.prefill_rows for t in s.prefill_tokens
                 for b in self._widths("prefill", t) if "prefill" in kinds]
        every += [("decode", r, 1 + self.drafts, b) for r in s.decode_batch
                  for b in self._widths("decode", 1 + self.drafts) if "decode" in kinds]
        head = self.first(kinds)
        return head + sorted((x for x in every if x not in head), key=lambda x: (x[3], x[1] * x[2], x[0]))

    def first(self, kinds: tuple[str, ...]) -> list[Shape]:
        """The cover-all shape of each kind: each holds every batch of its kind."""
        s, widest = self.serving, self.context[-1]
        return ([("decode", s.decode_batch[-1], 1 + self.drafts, widest)] if "decode" in kinds else []) + \
            ([("prefill", s.prefill_rows[-1], s.prefill_tokens[-1], widest)] if "prefill" in kinds else [])

    def _widths(self, kind: str, width: int) -> list[int]:
        below = max([t for t in self.serving.prefill_tokens if t < width], default=0) if kind == "prefill" else 0
        least = bucket(min(math.ceil((below + 1) / self.serving.block_size), self.max_blocks), self.context)
        return [b for b in self.context if b >= least]
