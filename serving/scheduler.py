"""Continuous batching as vLLM v1 and SGLang run it: the scheduler owns the requests. Requests join
and leave at any step. KV blocks are given on demand: a request gets blocks for its prompt when
admitted and one more each time its sequence crosses a block boundary (with MTP drafts: the rows
the step's drafts need); max_tokens only bounds the output. When a rank's pool cannot give a
running request its next block, the rank's most recently admitted request is preempted (recompute:
its full blocks stay in the prefix cache, it goes back to the front of the queue, and on
re-admission the part not cached is prefilled again; its output, logprobs and penalty counts are
kept, so nothing a client saw changes).

A step is mixed: every running decode first (one row each: its last token and its drafts), then the
rest of a per-rank token budget (serving.max_num_batched_tokens) filled with prefill chunks of the
waiting prompts, several prompts a step, a long prompt over several steps. The two parts run as a
decode batch and a prefill batch, two programs dispatched back to back in one engine step
(docs/DESIGN_NOTES.md: why not one ragged program). Each rank's rows form a contiguous slice of a
batch, because attention is data-parallel. After a step, `update_from_output` advances every
request of a batch by its sampled tokens: the one place requests advance (the engine, the
disaggregated engine and scripts/bench_balance.py all go through it).

Where a request runs is the balancers' choice (serving/balance.py): new prompts by the prefill
balancer, prefilled requests handed over from a prefill slice by the decode balancer. Everything
here is a function of the order of calls (no clock, no set or hash ordering), so processes that
see the same inputs schedule the same steps.
"""

from __future__ import annotations

import collections
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
        self.on_preempt: Callable[[Request], None] | None = None  # (the engine frees its penalty row)
        self.budget = cfg.token_budget()  # tokens per rank and step: decodes first, then prefill chunks
        self._admissions = 0  # admission order: the latest on a rank is preempted first
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

    @property
    def ranks(self) -> int:
        return len(self.pools)

    def add(self, req: Request) -> None:
        if req.id in self.requests:
            raise ValueError(f"request {req.id}: id already in use")
        # KV on demand: only the prompt must fit an empty rank; the output is bounded by what one
        # rank holds (a request alone on its rank is never preempted, so it always finishes)
        least = self._cap(req) - req.max_tokens + 1  # rows for the prompt and one token
        room = self.blocks_per_rank * self.cfg.block_size - least + 1  # the most tokens a rank can give it
        if room < 1:
            raise ValueError(f"request {req.id}: a prompt of {len(req.prompt)} tokens needs {self._blocks(least)} KV "
                             f"blocks, more than a rank's pool of {self.blocks_per_rank} (raise serving.kv_cache_mb)")
        if self.role == "mixed":
            req.max_tokens = min(req.max_tokens, room)
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

    def _cap(self, req: Request) -> int:
        """The most cache rows the request ever writes: every prompt token and every generated token
        but the last; with k drafts a step also writes the k draft rows after the last token and the
        MTP module drafts k - 1 rows further (rows past `computed`: rewritten by the next step)."""
        return len(req.prompt) + req.max_tokens - 1 + max(0, 2 * self.drafts - 1)

    def _rows(self, req: Request, pos: int, n: int) -> int:
        """Cache rows a step of n tokens at `pos` needs held: its own and the k - 1 the MTP module
        drafts past them (a decode window of 1 + k tokens: 2k past its last token)."""
        return min(pos + n + max(0, self.drafts - 1), self._cap(req))

    def _blocks(self, rows: int) -> int:
        return -(-rows // self.cfg.block_size)

    def blocks_needed(self, req: Request) -> int:
        """The worst case, prompt and max_tokens: what a decode slice reserves at hand-over (it cannot
        recompute a preempted request: the prefill slice would have to)."""
        return self._blocks(self._cap(req))

    def _open(self, rank: int) -> bool:
        return self.active[rank] and len(self.running[rank]) < self.max_running

    # ---- placement ---------------------------------------------------------------------------------
    def prefill_loads(self) -> np.ndarray:
        """[R, 2]: core-attention work and input tokens placed on each rank and not yet computed."""
        return np.array([[sum(core_attention(r.prefill_end, r.computed) for r in reqs if r.in_prefill),
                          sum(r.prefill_end - r.computed for r in reqs if r.in_prefill)] for reqs in self.running],
                        np.float64).reshape(self.ranks, 2)

    def decode_loads(self) -> np.ndarray:
        """[R, 2]: KV-cache tokens in use and running requests on each rank."""
        return np.array([[sum(r.computed for r in reqs), len(reqs)] for reqs in self.running],
                        np.float64).reshape(self.ranks, 2)

    def _admit(self) -> None:
        """FIFO: the prefill balancer places the oldest waiting request (a preempted one first), cache
        hits counted on the rank that holds them; it gets the blocks its prompt needs."""
        bs, loads, placed = self.cfg.block_size, None, False
        while self.waiting:
            req = self.waiting[0]
            target = req.prefill_end  # a preempted request recomputes its output but the last token too
            hashes = block_hashes((req.prompt + req.output)[:target], bs)
            # a prompt's last token is always recomputed (its sample is the first token)
            reusable = hashes if req.output else hashes[:(target - 1) // bs]
            hits, costs, on_disk = [], np.zeros((self.ranks, 2)), {}  # on_disk: by device-hit length
            allowed = np.zeros(self.ranks, bool)
            for rank, pool in enumerate(self.pools):
                hit = pool.match(reusable)
                if len(hit) not in on_disk:  # (file lookups: once per distinct device hit, not per rank)
                    on_disk[len(hit)] = self.disk[0](reusable[len(hit):]) if self.disk else 0
                cached = (len(hit) + on_disk[len(hit)]) * bs
                fresh = self._blocks(self._rows(req, 0, target)) - len(hit)
                allowed[rank] = self._open(rank) and fresh <= pool.available - sum(b in pool.evictable for b in hit)
                hits.append(hit)
                costs[rank] = core_attention(target, cached), target - cached
            loads = self.prefill_loads() if loads is None else loads
            rank = self.prefill_balancer.choose(loads, costs, allowed)
            if rank is None:
                break
            self.waiting.popleft()
            self._place(req, rank, hits[rank], hashes, reusable)
            loads[rank] += core_attention(target, req.computed), target - req.computed
            placed = True
        if placed:
            active = [r for r in range(self.ranks) if self.active[r]]
            self.balance["prefill_core_attention"].record(loads[active, 0])
            self.balance["prefill_input_tokens"].record(loads[active, 1])

    def _place(self, req: Request, rank: int, hit: list[int], hashes: list[bytes], reusable: list[bytes]) -> None:
        pool = self.pools[rank]
        pool.acquire(hit)
        fresh = pool.allocate(self._blocks(self._rows(req, 0, req.prefill_end)) - len(hit))
        req.rank, req.blocks, req.hashes = rank, hit + fresh, hashes[:len(req.prompt) // self.cfg.block_size]
        req.admitted, self._admissions = self._admissions, self._admissions + 1
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
    def schedule(self) -> list[Batch]:
        """The next step's batches: the decode rows of every running request past its prefill, then
        prefill chunks within what is left of each rank's token budget (decode first when both)."""
        if not self._grow():  # (as vLLM: nothing is admitted in a step that had to preempt)
            self._admit()
        chunk, rows = self.cfg.prefill_tokens[-1], self.cfg.prefill_rows[-1]
        prefill, decode = [], []
        for reqs in self.running:  # one pass: this runs every step over every running request
            # (async scheduling: a request whose last token in flight is its max_tokens-th has no next step)
            d = [(r, r.computed, 1 + len(r.drafts)) for r in reqs
                 if not r.in_prefill and len(r.output) + r.pending < r.max_tokens]
            left, p = self.budget - sum(n for _, _, n in d), []
            for r in reqs:
                if left <= 0 or len(p) == rows:
                    break
                if r.in_prefill:
                    n = min(chunk, r.prefill_end - r.computed, left)
                    p.append((r, r.computed, n))
                    left -= n
            prefill.append(p)
            decode.append(d)
        batches = []
        if any(decode):
            active = [rank for rank in range(self.ranks) if self.active[rank]]
            self.balance["decode_kv_tokens"].record([sum(p + 1 for _, p, _ in decode[r]) for r in active])
            self.balance["decode_requests"].record([len(decode[r]) for r in active])
            batches.append(Batch("decode", decode))
        if any(prefill):
            batches.append(Batch("prefill", prefill))
        return batches

    def _grow(self) -> bool:
        """KV on demand: gives each running decode, oldest first, the blocks its next step writes into;
        where a rank's pool has none left, preempts the rank's most recently admitted request until it
        has (vLLM's policy). Prompts hold their blocks from admission. -> whether any was preempted."""
        preempted = False
        for rank, reqs in enumerate(self.running):
            pool = self.pools[rank]
            for req in sorted(reqs, key=lambda r: r.admitted):
                if req.rank != rank or req.in_prefill:  # (preempted just now; a prompt's blocks are held)
                    continue
                short = self._blocks(self._rows(req, req.computed, 1 + len(req.drafts))) - len(req.blocks)
                while short > pool.available:  # (alone on its rank it always fits: add() bounds max_tokens)
                    victim = max(reqs, key=lambda r: r.admitted)
                    self.preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                if short > 0 and req.rank == rank:
                    req.blocks = req.blocks + pool.allocate(short)
        return preempted

    def preempt(self, req: Request) -> None:
        """Recompute preemption: the request's full blocks of computed rows join the prefix cache as
        evictable (re-admission mostly hits them), the rest are freed, and it goes to the front of the
        queue with its output, logprobs and drafts kept."""
        pool, seq = self.pools[req.rank], req.prompt + req.output
        for block, h in zip(req.blocks, block_hashes(seq[:req.computed], self.cfg.block_size)):
            pool.register(block, h)
        self.release(req)
        req.rank, req.blocks, req.cached, req.computed = -1, [], 0, 0
        self.waiting.appendleft(req)
        self.counters["preemptions"] += 1
        if self.on_preempt is not None:
            self.on_preempt(req)

    def dispatched(self, batch: Batch) -> None:
        """A batch went to the device: its rows' KV is as good as computed (positions advance now, so the
        next step can be scheduled before this one's tokens are read: async scheduling), and each row
        that samples has a token in flight (`pending`) until `update_from_output`. With MTP drafts a
        decode row's advance is known only when read (1 + the drafts accepted)."""
        for rows in batch.rows:
            for req, pos, n in rows:
                if batch.kind == "prefill":
                    req.computed = pos + n
                    req.pending += pos + n >= len(req.prompt) + len(req.output)
                else:
                    req.computed = pos + 1 if not self.drafts else req.computed
                    req.pending += 1

    def update_from_output(self, batch: Batch, tokens, logprobs=None, accepted=None, drafts=None) -> list[Event]:
        """Advances every request of the batch by its row's new tokens (tokens [B] or [B, S]: rank r's
        rows at [r * rows_per_rank, ...); accepted [B]: how many of a row's drafts the step accepted,
        so its run is tokens[row, :accepted + 1] (default 0); drafts [B, k]: the next step's drafts;
        logprobs: per row and position (logprob, top ids, top logprobs), serving/sampling.py `unpack`).
        A prompt chunk that ends mid-prompt (or a recompute) samples nothing; a finished prompt's blocks join the prefix
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
                if batch.kind == "prefill" and pos + n < len(req.prompt) + len(req.output):
                    continue  # a middle chunk of a long prompt, or a preempted request's recompute: no token
                req.pending -= 1
                if req.finish_reason is not None:  # finished (or aborted) after this step was dispatched
                    continue
                placed = req.rank >= 0  # (async: preempted after this step was dispatched; the token stands)
                if batch.kind == "decode" and self.drafts and placed:
                    req.computed = pos + 1 + a  # the window's last token and its accepted drafts are computed
                if batch.kind == "prefill" and placed:
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
                if reason and not placed:  # waiting to run again: nothing held
                    self.waiting.remove(req)
                    req.finish_reason, req.finished_at = reason, time.perf_counter()
                if reason:
                    if placed:
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
