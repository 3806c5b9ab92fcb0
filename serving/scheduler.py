"""Continuous batching: the scheduler owns the requests. Requests join and leave at any step. Each
step is a prefill step (chunks of prompts, in token-count buckets) or a decode step (one token per
running request, in batch-size buckets); each rank's rows form a contiguous slice of the batch,
because attention is data-parallel. After a step, `update_from_output` advances every request of
the batch by its sampled token: the one place requests advance (the engine, the disaggregated
engine and scripts/bench_balance.py all go through it).

Where a request runs is the balancers' choice (serving/balance.py): new prompts by the prefill
balancer, prefilled requests handed over from a prefill slice by the decode balancer.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

import numpy as np

from serving.balance import Balancedness, Balancer, core_attention
from serving.kv_cache import BlockPool, block_hashes
from serving.request import Batch, Event, Request, finish_reason
from serving.sampling import row_logprobs
from serving.stats import new_counters
from sharding.deployment import ServingConfig

# The disk tier's two questions: how many leading blocks it holds (no read), and "load these
# blocks into (rank, block ids)" -> how many loaded and verified, in order.
DiskPrefix = Callable[[list[bytes]], int]
DiskFetch = Callable[[int, list[bytes], list[int]], int]


ROLES = ("mixed", "prefill", "decode")


class Scheduler:
    def __init__(self, cfg: ServingConfig, ranks: int, blocks_per_rank: int,
                 disk: tuple[DiskPrefix, DiskFetch] | None = None, max_running: int | None = None,
                 role: str = "mixed", eos_token_ids=(), counters: dict | None = None, drafts: int = 0):
        """max_running: requests per rank (default: the largest decode batch; a prefill slice's
        queue is bounded by its KV blocks alone). role: mixed (prefill and decode here), prefill
        (finished prompts wait in `outbox` for a decode slice) or decode (takes prefilled requests
        through `receive`). counters: shared with the engine (serving/stats.py). drafts: k, the MTP
        draft tokens a decode row verifies (0: none)."""
        if role not in ROLES:
            raise ValueError(f"engine role {role!r} is not one of {ROLES}")
        self.cfg, self.role, self.eos_token_ids, self.drafts = cfg, role, tuple(eos_token_ids), drafts
        self.counters = counters if counters is not None else new_counters()
        self.requests: dict[str, Request] = {}  # every request not yet finished (or handed over)
        self.finished: collections.deque[Request] = collections.deque(maxlen=4096)  # recent ones, for stats
        self.outbox: list[Request] = []  # prefill role: prompts done, KV still here, waiting for a decode rank
        self.on_prompt_done: Callable[[Request], None] | None = None  # (the disk tier stores its blocks)
        self.max_running = max_running or cfg.decode_batch[-1]
        self.blocks_per_rank = blocks_per_rank
        self.pools = [BlockPool(blocks_per_rank) for _ in range(ranks)]
        self.active = [True] * ranks  # a draining rank (elastic resize) takes no new requests
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[list[Request]] = [[] for _ in range(ranks)]
        self.disk = disk
        self.prefill_balancer, self.decode_balancer = Balancer(cfg.placement), Balancer(cfg.placement)
        self.balance = {"prefill_core_attention": Balancedness(), "prefill_input_tokens": Balancedness(),
                        "decode_kv_tokens": Balancedness(), "decode_requests": Balancedness()}
        self._last = "decode"

    @property
    def ranks(self) -> int:
        return len(self.pools)

    def add(self, req: Request) -> None:
        if req.id in self.requests:
            raise ValueError(f"request {req.id}: id already in use")
        need = self.blocks_needed(req)
        if need > self.blocks_per_rank:
            raise ValueError(f"request {req.id}: needs {need} KV blocks, more than a rank's pool of "
                             f"{self.blocks_per_rank} (raise serving.kv_cache_mb or lower max_tokens)")
        self.waiting.append(req)
        self.requests[req.id] = req
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(req.prompt)

    def abort(self, request_id: str) -> None:
        """Cancels a request (a client went away): its blocks are freed now."""
        req = self.requests.pop(request_id, None)
        if req is None or req.finish_reason is not None:
            return
        if req in self.waiting:
            self.waiting.remove(req)
            req.finish_reason = "abort"
        elif req in self.outbox:  # prefilled, not yet handed over
            self.outbox.remove(req)
            self.pools[req.rank].release(req.blocks)
            req.finish_reason = "abort"
        else:
            self.finish(req, "abort")

    def blocks_needed(self, req: Request) -> int:
        # every prompt token and every generated token but the last gets a cache row; with k drafts a
        # step also writes the k draft rows after the last token and the MTP module drafts k - 1 rows
        # further (rows past `computed`: rewritten by the next step, never visible)
        extra = max(0, 2 * self.drafts - 1)
        return math.ceil((len(req.prompt) + req.max_tokens - 1 + extra) / self.cfg.block_size)

    def _open(self, rank: int) -> bool:
        return self.active[rank] and len(self.running[rank]) < self.max_running

    # ---- placement ---------------------------------------------------------------------------------
    def prefill_loads(self) -> np.ndarray:
        """[R, 2]: core-attention work and input tokens placed on each rank and not yet computed."""
        return np.array([[sum(core_attention(len(r.prompt), r.computed) for r in reqs if r.in_prefill),
                          sum(len(r.prompt) - r.computed for r in reqs if r.in_prefill)] for reqs in self.running],
                        np.float64).reshape(self.ranks, 2)

    def decode_loads(self) -> np.ndarray:
        """[R, 2]: KV-cache tokens in use and running requests on each rank."""
        return np.array([[sum(r.computed for r in reqs), len(reqs)] for reqs in self.running],
                        np.float64).reshape(self.ranks, 2)

    def _admit(self) -> None:
        """FIFO: the prefill balancer places the oldest waiting request, cache hits counted on the rank
        that holds them; all its blocks are reserved up front so a running request never waits."""
        bs, loads, placed = self.cfg.block_size, None, False
        while self.waiting:
            req = self.waiting[0]
            hashes = block_hashes(req.prompt, bs)
            reusable = hashes[:(len(req.prompt) - 1) // bs]  # the last prompt token is always recomputed
            hits, costs, on_disk = [], np.zeros((self.ranks, 2)), {}  # on_disk: by device-hit length
            allowed = np.zeros(self.ranks, bool)
            for rank, pool in enumerate(self.pools):
                hit = pool.match(reusable)
                if len(hit) not in on_disk:  # (file lookups: once per distinct device hit, not per rank)
                    on_disk[len(hit)] = self.disk[0](reusable[len(hit):]) if self.disk else 0
                cached = (len(hit) + on_disk[len(hit)]) * bs
                fresh = self.blocks_needed(req) - len(hit)
                allowed[rank] = self._open(rank) and fresh <= pool.available - sum(b in pool.evictable for b in hit)
                hits.append(hit)
                costs[rank] = core_attention(len(req.prompt), cached), len(req.prompt) - cached
            loads = self.prefill_loads() if loads is None else loads
            rank = self.prefill_balancer.choose(loads, costs, allowed)
            if rank is None:
                break
            self.waiting.popleft()
            self._place(req, rank, hits[rank], hashes, reusable)
            loads[rank] += core_attention(len(req.prompt), req.computed), len(req.prompt) - req.computed
            placed = True
        if placed:
            active = [r for r in range(self.ranks) if self.active[r]]
            self.balance["prefill_core_attention"].record(loads[active, 0])
            self.balance["prefill_input_tokens"].record(loads[active, 1])

    def _place(self, req: Request, rank: int, hit: list[int], hashes: list[bytes], reusable: list[bytes]) -> None:
        pool = self.pools[rank]
        pool.acquire(hit)
        req.rank, req.blocks, req.hashes = rank, hit + pool.allocate(self.blocks_needed(req) - len(hit)), hashes
        loaded = 0
        if self.disk and len(hit) < len(reusable):
            loaded = self.disk[1](rank, reusable[len(hit):], req.blocks[len(hit):len(reusable)])
            for i in range(len(hit), len(hit) + loaded):
                pool.register(req.blocks[i], hashes[i])
        req.cached = req.computed = (len(hit) + loaded) * self.cfg.block_size
        self.running[rank].append(req)

    def receive(self, req: Request) -> bool:
        """A request prefilled elsewhere (its KV rows for positions < computed arrive by hand-over):
        the decode balancer picks its rank and reserves all its blocks. False: no room yet."""
        need = self.blocks_needed(req)
        allowed = np.array([self._open(r) and self.pools[r].available >= need for r in range(self.ranks)])
        cost = np.tile([req.computed, 1.0], (self.ranks, 1))
        rank = self.decode_balancer.choose(self.decode_loads(), cost, allowed)
        if rank is None:
            return False
        req.rank, req.blocks = rank, self.pools[rank].allocate(need)
        self.running[rank].append(req)
        self.requests[req.id] = req
        return True

    def handed_over(self, req: Request, rank: int, blocks: list[int]) -> None:
        """Prefill role: the request now decodes elsewhere; its blocks here (on `rank`) are free."""
        self.outbox.remove(req)
        del self.requests[req.id]
        self.pools[rank].release(blocks)

    # ---- steps -------------------------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        self._admit()
        chunk, rows = self.cfg.prefill_tokens[-1], self.cfg.prefill_rows[-1]
        prefill, decode = [], []
        for reqs in self.running:  # one pass: this runs every step over every running request
            p, d = [], []
            for r in reqs:
                left = len(r.prompt) - r.computed
                if left > 0:
                    p.append((r, r.computed, min(chunk, left)))
                else:
                    d.append((r, r.computed, 1 + len(r.drafts)))
            prefill.append(p[:rows])
            decode.append(d)
        has_prefill, has_decode = any(prefill), any(decode)
        # alternate when both wait, so neither new requests nor running ones starve
        if has_prefill and (not has_decode or self._last == "decode"):
            self._last = "prefill"
            return Batch("prefill", prefill)
        if has_decode:
            self._last = "decode"
            active = [rank for rank in range(self.ranks) if self.active[rank]]
            self.balance["decode_kv_tokens"].record([sum(p + 1 for _, p, _ in decode[r]) for r in active])
            self.balance["decode_requests"].record([len(decode[r]) for r in active])
            return Batch("decode", decode)
        return None

    def update_from_output(self, batch: Batch, tokens, logprobs=None, accepted=None, drafts=None) -> list[Event]:
        """Advances every request of the batch by its row's new tokens (tokens [B] or [B, S]: rank r's
        rows at [r * rows_per_rank, ...); accepted [B]: how many of a row's drafts the step accepted,
        so its run is tokens[row, :accepted + 1] (default 0); drafts [B, k]: the next step's drafts;
        logprobs: per row and position (logprob, top ids, top logprobs), serving/sampling.py `unpack`).
        A prompt chunk that ends mid-prompt samples nothing; a finished prompt's blocks join the prefix
        cache; a run is cut at the first stop token or at max_tokens, the request then finishing and
        freeing its blocks; on a prefill slice the others move to the outbox."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:  # one token per row
            tokens = tokens[:, None]
            logprobs = logprobs and [np.asarray(x)[:, None] for x in logprobs]
        rows_b = len(tokens) // self.ranks
        counters, events, now = self.counters, [], time.perf_counter()
        for rank, rows in enumerate(batch.rows):
            for (req, pos, n), slot in zip(rows, batch.slots[rank] if batch.slots else range(len(rows))):
                row = rank * rows_b + slot
                a = int(accepted[row]) if accepted is not None else 0
                # a decode row's window is its last token then its drafts: the accepted ones are computed
                req.computed = pos + n if batch.kind == "prefill" else pos + 1 + a
                if req.in_prefill:  # a middle chunk of a long prompt: its sample is not a token
                    continue
                if batch.kind == "prefill":
                    self.register_prompt_blocks(req)
                    if self.on_prompt_done is not None:
                        self.on_prompt_done(req)
                    counters["cached_prompt_tokens"] += req.cached
                    req.first_token_at = now
                elif n > 1:
                    counters["spec_drafts"] += 1
                    counters["spec_draft_tokens"] += n - 1
                    counters["spec_accepted_tokens"] += a
                reason, new, lp = None, [], None if req.params.logprobs is None else []
                for i, token in enumerate(int(t) for t in tokens[row, :a + 1]):
                    req.output.append(token)
                    new.append(token)
                    counters["kv_tokens_read"] += pos + n if batch.kind == "prefill" else pos + 1 + i  # its context
                    if lp is not None:
                        lp.append(row_logprobs(req.params, token, *(x[row, i] for x in logprobs)))
                    reason = finish_reason(req, token, self.eos_token_ids)
                    if reason:
                        break
                counters["generated_tokens"] += len(new)
                req.drafts = [] if drafts is None or reason else [int(t) for t in drafts[row]]
                if reason:
                    self.finish(req, reason)
                    counters["finished"] += 1
                    self.finished.append(self.requests.pop(req.id))
                elif self.role == "prefill":  # decode happens on the decode slice; the blocks stay until sent
                    self.running[req.rank].remove(req)
                    self.outbox.append(req)
                events.append(Event(req, new, reason is not None, lp))
        return events

    def finish(self, req: Request, reason: str) -> None:
        req.finish_reason, req.finished_at = reason, time.perf_counter()
        self.release(req)

    def release(self, req: Request) -> None:
        """Takes the request off its rank (finished, handed over or migrated) and frees its blocks."""
        self.running[req.rank].remove(req)
        self.pools[req.rank].release(req.blocks)

    def register_prompt_blocks(self, req: Request) -> None:
        """Once its prompt is in the cache, the request's full prompt blocks serve later prefixes."""
        for i, h in enumerate(req.hashes):
            self.pools[req.rank].register(req.blocks[i], h)

    # ---- elastic resize ----------------------------------------------------------------------------
    def migrations(self, leaving: list[int]) -> list[tuple[Request, int, list[int]]]:
        """Moves for the requests of ranks about to leave: (request, new rank, new blocks), each placed
        by the decode balancer among the staying ranks. A request that finds no room stays, and
        finishes where it is. Apply each move with `move` once its blocks are copied."""
        for rank in leaving:
            self.active[rank] = False
        loads, moves = self.decode_loads(), []
        for rank in leaving:
            for req in self.running[rank]:
                need = len(req.blocks)
                allowed = np.array([self.active[r] and loads[r, 1] < self.max_running
                                    and self.pools[r].available >= need for r in range(self.ranks)])
                cost = np.tile([req.computed, 1.0], (self.ranks, 1))
                dest = self.decode_balancer.choose(loads, cost, allowed)
                if dest is None:
                    continue
                loads[dest] += cost[dest]
                moves.append((req, dest, self.pools[dest].allocate(need)))
        return moves

    def move(self, req: Request, rank: int, blocks: list[int]) -> None:
        self.release(req)
        req.rank, req.blocks = rank, blocks
        self.running[rank].append(req)
        if not req.in_prefill:
            self.register_prompt_blocks(req)

    def resize(self, ranks: int) -> None:
        """Keeps ranks [0, ranks) (the others must be empty) and adds fresh ones up to `ranks`."""
        assert not any(self.running[ranks:]), "ranks leaving still hold requests"
        keep = min(ranks, self.ranks)
        extra = ranks - keep
        self.pools = self.pools[:keep] + [BlockPool(self.blocks_per_rank) for _ in range(extra)]
        self.running = self.running[:keep] + [[] for _ in range(extra)]
        self.active = [True] * ranks

    @property
    def idle(self) -> bool:
        return not self.waiting and not any(self.running) and not self.outbox
