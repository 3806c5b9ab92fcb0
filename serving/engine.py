"""The engine's step loop: schedule -> one jitted step (forward over the paged cache + sampling on
device) -> stream tokens -> free finished requests. The host holds all state; the step is a pure
function of (weights, cache pool, batch arrays), compiled once per shape bucket."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from serving.config import ServingConfig, bucket
from serving.kv_cache import PagedCache, new_pool
from serving.sampling import SamplingParams, sample, sampling_arrays
from sharding.overlap import balanced_slots
from serving.scheduler import Batch, Request, Scheduler


def _compile_step(net, mesh, cache_mesh):
    """The engine's jitted step for this model (and EP capacity bucket). The weights go in as a flat
    list of arrays: flattening nnx.State or hashing a graphdef on every call would cost
    milliseconds of host time per step."""
    graphdef, state = nnx.split(net)
    leaves, treedef = jax.tree.flatten(state)

    def step(leaves, pool, expert_load, page_table, tokens, positions, sample_at, temperature, top_k, top_p, seeds,
             counters, absorbed: bool):
        net = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        hidden, cache, stats = net.forward_step(tokens, positions, PagedCache(pool, page_table, cache_mesh), absorbed)
        last = hidden[jnp.arange(tokens.shape[0]), sample_at]  # [B, D]: each row's sampled position
        next_tokens = sample(net.logits(last), temperature, top_k, top_p, seeds, counters)
        overflow = stats["overflow"] if stats else jnp.bool_(False)
        if stats:
            expert_load = expert_load + stats["expert_load"]
        # one array to read back per step: the tokens, then the EP overflow flag
        return jnp.concatenate([next_tokens, overflow.astype(jnp.int32)[None]]), cache.pool, expert_load

    shardings = None
    if mesh is not None:  # what the host reads is replicated, so every process (multi-host) can read it
        replicated = NamedSharding(mesh, P())
        shardings = (replicated, NamedSharding(mesh, P(None, "dp")), replicated)
    return leaves, jax.jit(step, static_argnames=("absorbed",), donate_argnames=("pool", "expert_load"),
                           out_shardings=shardings)


@dataclasses.dataclass
class Event:
    """What one step did to one request: new tokens, and the finish reason once it is done."""
    request: Request
    new_tokens: list[int]
    finished: bool


@dataclasses.dataclass(frozen=True)
class Rebalancing:
    """Live EPLB policy (from the deployment's experts section)."""
    interval: int  # engine steps between looks at the expert loads
    window: int  # looks whose loads the next placement is computed from
    threshold: float  # re-place when mean-over-layers max/mean GPU load exceeds this
    nodes: int


class Engine:
    def __init__(self, net, serving: ServingConfig, mesh=None, rebalancing: Rebalancing | None = None):
        cfg = net.config
        self.net, self.cfg, self.mesh = net, serving, mesh
        self.ranks = 1 if mesh is None else mesh.shape["dp"]
        # a one-device mesh still fixes the arrays' layout (so warm-up and serving share compilations)
        # but needs no per-rank shard_map around cache reads and writes
        self.cache_mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.context_len = serving.context_len(cfg.max_position_embeddings)
        self.max_blocks = math.ceil(self.context_len / serving.block_size)
        self.context_buckets = tuple(sorted({min(2 ** i, self.max_blocks) for i in
                                             range(math.ceil(math.log2(self.max_blocks)) + 1)}))
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        kv_dtype = {"auto": net.dtype, "bf16": jnp.bfloat16, "fp32": jnp.float32}[serving.kv_dtype]
        self.blocks_per_rank = serving.blocks_per_rank(cfg.num_hidden_layers, width, jnp.dtype(kv_dtype).itemsize)
        self.pool = new_pool(cfg.num_hidden_layers, self.ranks, self.blocks_per_rank, serving.block_size, width,
                             kv_dtype, mesh)
        self.finished: collections.deque[Request] = collections.deque(maxlen=4096)  # recent ones, for stats
        self.scheduler = Scheduler(serving, self.ranks, self.blocks_per_rank)
        self.leaves, self._step = _compile_step(net, mesh, self.cache_mesh)
        self._compiled_before = 0  # compilations of earlier steps (before an EP capacity escalation)
        moe = net.moe_layers
        load = np.zeros((0, 0) if moe is None else moe.mlp.phy2log.shape, np.int32)  # summed over steps, for EPLB
        self.expert_load = jax.device_put(load, NamedSharding(mesh, P()) if mesh is not None else None)
        self.requests: dict[str, Request] = {}
        self.counters = dict(requests=0, finished=0, rejected=0, prompt_tokens=0, cached_prompt_tokens=0,
                             generated_tokens=0, kv_tokens_read=0, prefill_steps=0, decode_steps=0, prefill_s=0.0,
                             decode_s=0.0, ep_overflow_retries=0)
        self.started = time.perf_counter()
        self.devices = 1 if mesh is None else mesh.size
        self.last_step: dict = {}
        self.rebalancing = rebalancing if net.ep is not None and rebalancing and rebalancing.interval else None
        self._load_window: collections.deque = collections.deque(maxlen=rebalancing.window if rebalancing else 1)
        self._load_seen = 0
        self.eplb = {"rebalances": 0, "last": None}
        self._next_id = 0

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Validates and queues a request; a bad one raises ValueError naming it, and nothing else changes."""
        rid = request_id or f"req-{self._next_id}"
        self._next_id += 1
        if rid in self.requests:
            raise ValueError(f"request {rid}: id already in use")
        prompt = [int(t) for t in prompt]
        vocab = self.net.config.vocab_size
        if not prompt:
            raise ValueError(f"request {rid}: empty prompt")
        if len(prompt) >= self.context_len:
            raise ValueError(f"request {rid}: prompt of {len(prompt)} tokens does not fit the context of "
                             f"{self.context_len} (serving.max_model_len) with room to generate")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {rid}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        seed = params.seed if params.seed is not None else zlib.crc32(rid.encode())
        req = Request(rid, prompt, params, seed, min(params.max_tokens, self.context_len - len(prompt)))
        self.scheduler.add(req)
        self.requests[rid] = req
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(prompt)
        return req

    def abort(self, request_id: str) -> None:
        """Cancels a request (a client went away): its blocks are freed now."""
        req = self.requests.pop(request_id, None)
        if req is None or req.finish_reason is not None:
            return
        if req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
            req.finish_reason = "abort"
        else:
            self.scheduler.finish(req, "abort")

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        arrays = self._arrays(batch)
        prepared = time.perf_counter()
        wait = 0.0
        while True:
            out, self.pool, self.expert_load = self._step(self.leaves, self.pool, self.expert_load, *arrays,
                                                          absorbed=batch.kind == "decode")
            dispatched = time.perf_counter()
            out = np.asarray(out)  # the one device->host sync of a step
            wait += time.perf_counter() - dispatched
            if not out[-1]:
                break
            # Rows did not fit the EP capacity bucket: re-run at the next one. Re-running on the
            # returned pool is safe: every cache row this step reads it first writes again.
            self._compiled_before += self._step._cache_size()
            self.net.set_expert_parallel(self.net.ep.escalated())
            self.leaves, self._step = _compile_step(self.net, self.mesh, self.cache_mesh)
            self.counters["ep_overflow_retries"] += 1
        next_tokens = out[:-1]
        returned = time.perf_counter()
        events = self._advance(batch, next_tokens)
        done = time.perf_counter()
        elapsed = done - start
        self.counters[f"{batch.kind}_steps"] += 1
        self.counters[f"{batch.kind}_s"] += elapsed
        # host bookkeeping: building the batch before the jitted call and advancing requests after it
        self.last_step = {"kind": batch.kind, "wall_s": elapsed, "host_s": (prepared - start) + (done - returned)}
        steps = self.counters["prefill_steps"] + self.counters["decode_steps"]
        if self.rebalancing and steps % self.rebalancing.interval == 0:
            self._rebalance()
        return events

    def _rebalance(self) -> None:
        """Live EPLB between steps: loads of the last window -> new placement -> weights moved."""
        from sharding.eplb import balancedness, move_experts, rebalance_experts
        mlp, cfg, ranks = self.net.moe_layers.mlp, self.net.config, self.net.ep.ranks
        self._load_window.append(self._unseen_logical_load())
        self._load_seen = np.asarray(self.expert_load)
        phy2log, logcnt = np.asarray(mlp.phy2log[...]), np.asarray(mlp.logcnt[...])
        weight = sum(self._load_window)
        before = balancedness(weight, phy2log, logcnt, ranks)
        if weight.sum() == 0 or before.mean() <= self.rebalancing.threshold:
            return
        new = rebalance_experts(weight, phy2log.shape[1], cfg.n_group, self.rebalancing.nodes, ranks)
        after = balancedness(weight, new[0], new[2], ranks)
        if after.mean() >= before.mean():
            return
        move_experts(self.net.moe_layers, *new)
        self.leaves = jax.tree.leaves(nnx.state(self.net))  # same tree, so the compiled step is reused
        self.expert_load, self._load_seen = jnp.zeros_like(self.expert_load), 0  # slots now mean other experts
        self.eplb["rebalances"] += 1
        self.eplb["last"] = {"step": self.counters["prefill_steps"] + self.counters["decode_steps"],
                             "balancedness_before": before.tolist(), "balancedness_after": after.tolist(),
                             "mean_before": float(before.mean()), "mean_after": float(after.mean()),
                             "gpu_load_before": gpu_sum(weight, phy2log, logcnt, ranks),
                             "gpu_load_after": gpu_sum(weight, new[0], new[2], ranks)}

    def warmup(self) -> int:
        """Compiles every shape bucket on an all-padding batch (it writes nothing), so serving never
        compiles; returns the number of compilations this took."""
        before = self.compilations
        shapes = [("prefill", r, t) for r in self.cfg.prefill_rows for t in self.cfg.prefill_tokens]
        shapes += [("decode", b, 1) for b in self.cfg.decode_batch]
        for kind, rows, width in shapes:
            for blocks in self.context_buckets:
                B = rows * self.ranks
                arrays = (np.zeros((B, blocks), np.int32), np.zeros((B, width), np.int32),
                          np.full((B, width), -1, np.int32), np.zeros(B, np.int32),
                          *sampling_arrays([None] * B, [0] * B, [0] * B))
                out, self.pool, self.expert_load = self._step(self.leaves, self.pool, self.expert_load, *arrays,
                                                              absorbed=kind == "decode")
        jax.block_until_ready(out)
        return self.compilations - before

    def _arrays(self, batch: Batch) -> tuple:
        cfg = self.cfg
        per_rank = max(len(rows) for rows in batch.rows)
        if batch.kind == "prefill":
            rows_b = bucket(per_rank, cfg.prefill_rows)
            width = bucket(max(n for rows in batch.rows for _, _, n in rows), cfg.prefill_tokens)
        else:
            rows_b, width = bucket(per_rank, cfg.decode_batch), 1
        need = max(math.ceil((p + n) / cfg.block_size) for rows in batch.rows for _, p, n in rows)
        blocks = bucket(need, self.context_buckets)
        B = rows_b * self.ranks
        tokens = np.zeros((B, width), np.int32)
        positions = np.full((B, width), -1, np.int32)
        table = np.zeros((B, blocks), np.int32)
        sample_at = np.zeros(B, np.int32)
        params, seeds, counters = [None] * B, [0] * B, [0] * B
        overlap = self.net.ep is not None and self.net.ep.overlap != "none"
        batch.slots = []
        for rank, rows in enumerate(batch.rows):
            # Under overlap each rank's rows form two micro-batches: balance core-attention work
            # (prefill: new tokens x context) or KV length (decode) between them.
            slots = (balanced_slots([n * (p + n) for _, p, n in rows], rows_b) if overlap
                     else list(range(len(rows))))
            batch.slots.append(slots)
            for (req, pos, n), slot in zip(rows, slots):
                b = rank * rows_b + slot
                seq = req.prompt + req.output
                tokens[b, :n] = seq[pos:pos + n]
                positions[b, :n] = np.arange(pos, pos + n)
                used = req.blocks[:blocks]
                table[b, :len(used)] = used
                sample_at[b] = n - 1
                params[b], seeds[b], counters[b] = req.params, req.seed, pos + n
        return (table, tokens, positions, sample_at, *sampling_arrays(params, seeds, counters))

    def _advance(self, batch: Batch, next_tokens: np.ndarray) -> list[Event]:
        rows_b = len(next_tokens) // self.ranks
        events, now = [], time.perf_counter()
        for rank, rows in enumerate(batch.rows):
            for (req, pos, n), slot in zip(rows, batch.slots[rank]):
                req.computed = pos + n
                if req.in_prefill:  # a middle chunk of a long prompt: its sample is not a token
                    continue
                if batch.kind == "prefill":
                    self.scheduler.register_prompt_blocks(req)
                    self.counters["cached_prompt_tokens"] += req.cached
                    req.first_token_at = now
                token = int(next_tokens[rank * rows_b + slot])
                req.output.append(token)
                self.counters["generated_tokens"] += 1
                self.counters["kv_tokens_read"] += pos + n  # the context this token attended over
                reason = self._finish_reason(req, token)
                if reason:
                    self.scheduler.finish(req, reason)
                    self.counters["finished"] += 1
                    self.finished.append(self.requests.pop(req.id))
                events.append(Event(req, [token], reason is not None))
        return events

    def _finish_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.net.config.eos_token_ids):
            return "stop"
        if len(req.output) >= req.max_tokens:
            return "length"
        return None

    # ---- statistics --------------------------------------------------------------------------------
    @property
    def compilations(self) -> int:
        return self._compiled_before + self._step._cache_size()

    def statistics_record(self, gpus_per_node: int = 8) -> dict:
        """The window served so far in the statistics-file form scripts/cost_report.py reads
        (serving/economics.py, docs/ECONOMICS.md)."""
        c = self.stats()
        return {"window_hours": max(c["gpu_seconds"] / self.devices / 3600, 1e-9), "gpus_per_node": gpus_per_node,
                "gpu_seconds": c["gpu_seconds"], "input_tokens_cache_hit": c["input_tokens_cache_hit"],
                "input_tokens_cache_miss": c["input_tokens_cache_miss"], "output_tokens": c["generated_tokens"]}

    def eplb_stats(self) -> dict:
        """Balancedness (max / mean GPU load, per MoE layer and overall) of the loads seen so far under
        the current placement, and the last live rebalance's before/after."""
        if self.net.ep is None or self.net.moe_layers is None:
            return {}
        from sharding.eplb import balancedness
        mlp = self.net.moe_layers.mlp
        weight = sum(self._load_window) + self._unseen_logical_load()
        per_layer = balancedness(weight, np.asarray(mlp.phy2log[...]), np.asarray(mlp.logcnt[...]), self.net.ep.ranks)
        return {"balancedness_per_layer": per_layer.tolist(), "balancedness": float(per_layer.mean()), **self.eplb}

    def _unseen_logical_load(self) -> np.ndarray:
        """Tokens per logical expert [L, E] since the last look, read through the current placement."""
        from sharding.eplb import logical_loads
        unseen = np.asarray(self.expert_load) - self._load_seen
        return logical_loads(unseen, np.asarray(self.net.moe_layers.mlp.phy2log[...]), self.net.config.n_routed_experts)

    def stats(self) -> dict:
        c = dict(self.counters)
        done = [r for r in self.finished if r.first_token_at]
        ttft = [r.first_token_at - r.arrival for r in done]
        speed = [(len(r.output) - 1) / (r.finished_at - r.first_token_at) for r in done
                 if len(r.output) > 1 and r.finished_at > r.first_token_at]
        c.update(
            running=sum(len(r) for r in self.scheduler.running), waiting=len(self.scheduler.waiting),
            cache_hit_rate=c["cached_prompt_tokens"] / max(c["prompt_tokens"], 1),
            input_tokens_cache_hit=c["cached_prompt_tokens"],
            input_tokens_cache_miss=c["prompt_tokens"] - c["cached_prompt_tokens"],
            average_kv_length_per_output_token=c["kv_tokens_read"] / max(c["generated_tokens"], 1),
            gpu_seconds=(time.perf_counter() - self.started) * self.devices,
            prefill_tokens_per_s=(c["prompt_tokens"] - c["cached_prompt_tokens"]) / max(c["prefill_s"], 1e-9),
            decode_tokens_per_s=c["generated_tokens"] / max(c["decode_s"], 1e-9),
            ttft_s=_percentiles(ttft), tokens_per_s_per_user=_percentiles(speed),
            kv_blocks_total_per_rank=self.blocks_per_rank,
            kv_blocks_used=[p.used for p in self.scheduler.pools],
            kv_blocks_cached=[len(p.evictable) for p in self.scheduler.pools],
            compilations=self.compilations, ep_capacity_level=None if self.net.ep is None else self.net.ep.level,
            eplb=self.eplb_stats(),
        )
        return c


def gpu_sum(weight, phy2log, logcnt, ranks) -> list[float]:
    """Each GPU's load summed over layers: the report's per-GPU bars."""
    from sharding.eplb import gpu_loads
    return gpu_loads(weight, phy2log, logcnt, ranks).sum(0).tolist()


def _percentiles(values) -> dict:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}
