"""Continuous batching: requests join and leave at any step. Each step is a prefill step (chunks of
prompts, in token-count buckets) or a decode step (one token per running request, in batch-size
buckets); each rank's rows form a contiguous slice of the batch, because attention is data-parallel.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

from serving.config import ServingConfig
from serving.kv_cache import BlockPool, block_hashes
from serving.sampling import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int  # params.max_tokens, capped so the sequence fits the context
    rank: int = -1
    blocks: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # full prompt blocks
    cached: int = 0  # prompt tokens found in the prefix cache
    computed: int = 0  # tokens whose KV rows are in the cache
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def in_prefill(self) -> bool:
        return self.computed < len(self.prompt)


@dataclasses.dataclass
class Batch:
    kind: str  # "prefill" | "decode"
    rows: list[list[tuple[Request, int, int]]]  # per rank: (request, first position, token count)
    slots: list[list[int]] = dataclasses.field(default_factory=list)  # per rank: each row's place in the batch


class Scheduler:
    def __init__(self, cfg: ServingConfig, ranks: int, blocks_per_rank: int):
        self.cfg = cfg
        self.pools = [BlockPool(blocks_per_rank) for _ in range(ranks)]
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[list[Request]] = [[] for _ in range(ranks)]
        self._last = "decode"

    def add(self, req: Request) -> None:
        need = self.blocks_needed(req)
        if need > self.pools[0].num_blocks:
            raise ValueError(f"request {req.id}: needs {need} KV blocks, more than a rank's pool of "
                             f"{self.pools[0].num_blocks} (raise serving.kv_cache_mb or lower max_tokens)")
        self.waiting.append(req)

    def blocks_needed(self, req: Request) -> int:
        # every prompt token and every generated token but the last gets a cache row
        return math.ceil((len(req.prompt) + req.max_tokens - 1) / self.cfg.block_size)

    def _admit(self) -> None:
        """FIFO: place the oldest waiting request on the rank with the longest cached prefix (then the
        most free blocks), reserving all its blocks up front so a running request never waits."""
        bs = self.cfg.block_size
        while self.waiting:
            req = self.waiting[0]
            # at least the last prompt token is recomputed, into a block of the request's own
            hashes = block_hashes(req.prompt, bs)
            reusable = hashes[:(len(req.prompt) - 1) // bs]
            best = None
            for rank, pool in enumerate(self.pools):
                if len(self.running[rank]) >= self.cfg.decode_batch[-1]:
                    continue
                hit = pool.match(reusable)
                fresh = self.blocks_needed(req) - len(hit)
                if fresh > pool.available - sum(b in pool.evictable for b in hit):
                    continue
                key = (len(hit), pool.available - len(self.running[rank]))
                if best is None or key > best[0]:
                    best = (key, rank, hit, fresh)
            if best is None:
                return
            _, rank, hit, fresh = best
            pool = self.pools[rank]
            pool.acquire(hit)
            req.rank, req.blocks, req.hashes = rank, hit + pool.allocate(fresh), hashes
            req.cached = req.computed = len(hit) * bs
            self.running[rank].append(req)
            self.waiting.popleft()

    def schedule(self) -> Batch | None:
        self._admit()
        chunk = self.cfg.prefill_tokens[-1]
        prefill = [[(r, r.computed, min(chunk, len(r.prompt) - r.computed)) for r in reqs if r.in_prefill]
                   [:self.cfg.prefill_rows[-1]] for reqs in self.running]
        decode = [[(r, r.computed, 1) for r in reqs if not r.in_prefill] for reqs in self.running]
        has_prefill, has_decode = any(prefill), any(decode)
        # alternate when both wait, so neither new requests nor running ones starve
        if has_prefill and (not has_decode or self._last == "decode"):
            self._last = "prefill"
            return Batch("prefill", prefill)
        if has_decode:
            self._last = "decode"
            return Batch("decode", decode)
        return None

    def finish(self, req: Request, reason: str) -> None:
        req.finish_reason, req.finished_at = reason, time.perf_counter()
        self.running[req.rank].remove(req)
        self.pools[req.rank].release(req.blocks)

    def register_prompt_blocks(self, req: Request) -> None:
        """Once its prompt is in the cache, the request's full prompt blocks serve later prefixes."""
        for i, h in enumerate(req.hashes):
            self.pools[req.rank].register(req.blocks[i], h)

    @property
    def idle(self) -> bool:
        return not self.waiting and not any(self.running)
