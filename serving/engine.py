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

from serving.aot import AotStep, aot_directory, program_key
from serving.config import ServingConfig, bucket
from serving.kv_cache import PagedCache, copy_blocks, new_pool, pow2, read_rank, write_rank
from serving.sampling import PenaltyTable, SamplingParams, row_logprobs, sample, sampling_arrays, unpack
from sharding.mesh import make_mesh
from sharding.overlap import balanced_slots
from serving.scheduler import Batch, Request, Scheduler


def _compile_step(net, mesh, cache_mesh, kernel: str = "xla", slots: int = 0):
    """The engine's jitted step for this model (and EP capacity bucket). The weights go in as a flat
    list of arrays: flattening nnx.State or hashing a graphdef on every call would cost
    milliseconds of host time per step."""
    graphdef, state = nnx.split(net)
    leaves, treedef = jax.tree.flatten(state)

    def step(leaves, pool, expert_load, table, page_table, tokens, positions, sample_at, sampling, absorbed: bool):
        net = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        paged = PagedCache(pool, page_table, cache_mesh, kernel=kernel)
        hidden, cache, stats = net.forward_step(tokens, positions, paged, absorbed)
        last = hidden[jnp.arange(tokens.shape[0]), sample_at]  # [B, D]: each row's sampled position
        rows, next_tokens = sample(net.logits(last), sampling, table)  # rows: tokens + logprob data
        overflow = stats["overflow"] if stats else jnp.bool_(False)
        table = table.count(sampling.slot, next_tokens, ~overflow)
        if stats:
            expert_load = expert_load + stats["expert_load"]
        # one array to read back per step: the tokens and logprobs, then the EP overflow flag
        return jnp.concatenate([rows.reshape(-1), overflow.astype(jnp.int32)[None]]), cache.pool, expert_load, table

    shardings = None
    if mesh is not None:  # what the host reads is replicated, so every process (multi-host) can read it
        replicated, by_rank = NamedSharding(mesh, P()), NamedSharding(mesh, P("dp"))
        shardings = (replicated, NamedSharding(mesh, P(None, "dp")), replicated,
                     PenaltyTable.Device(by_rank, by_rank, slots, cache_mesh))
    return leaves, jax.jit(step, static_argnames=("absorbed",), donate_argnames=("pool", "expert_load", "table"),
                           out_shardings=shardings)


@dataclasses.dataclass
class Launched:
    """A dispatched step: its batch, the arrays it ran on, its output (still on device)."""
    batch: Batch
    arrays: tuple
    out: jax.Array
    start: float
    prepared: float


@dataclasses.dataclass
class Event:
    """What one step did to one request: new tokens, and the finish reason once it is done."""
    request: Request
    new_tokens: list[int]
    finished: bool
    logprobs: list | None = None  # per new token: (logprob, [(id, logprob)] top) if the request asked


@dataclasses.dataclass(frozen=True)
class Rebalancing:
    """Live EPLB policy (from the deployment's experts section)."""
    interval: int  # engine steps between looks at the expert loads
    window: int  # looks whose loads the next placement is computed from
    threshold: float  # re-place when mean-over-layers max/mean GPU load exceeds this
    gpus_per_node: int = 8

    def nodes(self, ranks: int) -> int:
        return max(1, -(-ranks // self.gpus_per_node))


ROLES = ("mixed", "prefill", "decode")


class Engine:
    def __init__(self, net, serving: ServingConfig, mesh=None, rebalancing: Rebalancing | None = None,
                 role: str = "mixed"):
        """role: mixed (prefill and decode here), prefill (finished prompts wait in `outbox` for a
        decode slice, serving/disagg.py) or decode (takes prefilled requests through `receive`)."""
        if role not in ROLES:
            raise ValueError(f"engine role {role!r} is not one of {ROLES}")
        cfg = net.config
        self.net, self.cfg, self.mesh, self.role = net, serving, mesh, role
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
        local = mesh is None or any(d.process_index == jax.process_index() for d in mesh.devices.flat)
        self.disk = self._open_disk(kv_dtype, width) if serving.disk_cache_dir and local else None
        self.scheduler = Scheduler(serving, self.ranks, self.blocks_per_rank,
                                   (self.disk.prefix, self._fetch_from_disk) if self.disk else None,
                                   max_running=self.blocks_per_rank if role == "prefill" else None)
        self.outbox: list[Request] = []  # prefill role: prompts done, KV still here, waiting for a decode rank
        # penalties / logit_bias rows: one per request that samples on a rank (a prefill slice's leave
        # after one step, so a batch's rows are enough there)
        slots = serving.prefill_rows[-1] if role == "prefill" else self.scheduler.max_running
        self.penalties = PenaltyTable(self.ranks, slots, cfg.vocab_size, mesh)
        # One jitted step per (devices, EP capacity level): a resize back to devices served before,
        # or a capacity level seen before, finds its compiled programs again.
        self._steps: dict[tuple, object] = {}
        self._use_step()
        moe = net.moe_layers
        load = np.zeros((0, 0) if moe is None else moe.mlp.phy2log.shape, np.int32)  # summed over steps, for EPLB
        self.expert_load = jax.device_put(load, NamedSharding(mesh, P()) if mesh is not None else None)
        self.requests: dict[str, Request] = {}
        self.counters = dict(requests=0, finished=0, rejected=0, prompt_tokens=0, cached_prompt_tokens=0,
                             generated_tokens=0, kv_tokens_read=0, prefill_steps=0, decode_steps=0, prefill_s=0.0,
                             decode_s=0.0, ep_overflow_retries=0, disk_cached_prompt_tokens=0, resizes=0)
        self.started = time.perf_counter()
        self.devices = 1 if mesh is None else mesh.size
        self._device_seconds, self._devices_since = 0.0, self.started  # device-seconds before the last resize
        self.last_step: dict = {}
        self.rebalancing = rebalancing if net.ep is not None and rebalancing and rebalancing.interval else None
        self._load_window: collections.deque = collections.deque(maxlen=rebalancing.window if rebalancing else 1)
        self._load_seen = 0
        self.eplb = {"rebalances": 0, "last": None}
        self._next_id = 0
        self._resize_to: list | None = None  # devices of a resize waiting for leaving ranks to empty
        self.resizes: list[dict] = []

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
        try:
            params.check_vocabulary(vocab)
        except ValueError as e:
            raise ValueError(f"request {rid}: {e}") from None
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
        self.penalties.release(request_id)
        if req is None or req.finish_reason is not None:
            return
        if req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
            req.finish_reason = "abort"
        elif req in self.outbox:  # prefilled, not yet handed over
            self.outbox.remove(req)
            self.scheduler.pools[req.rank].release(req.blocks)
            req.finish_reason = "abort"
        else:
            self.scheduler.finish(req, "abort")

    @property
    def idle(self) -> bool:
        return self.scheduler.idle and not self.outbox and self._resize_to is None

    def receive(self, req: Request) -> bool:
        """Decode role: takes a request prefilled elsewhere if a rank has room; the caller then writes
        its KV blocks (serving/disagg.py). False: try again after some requests finish."""
        if not self.scheduler.receive(req):
            return False
        self.requests[req.id] = req
        return True

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        launched = self.launch()
        if launched is None:
            return []
        host = np.asarray(launched.out)  # the one device->host sync of a step
        while self.retry_if_overflowed(launched, host):
            host = np.asarray(launched.out)
        return self.land(launched, host)

    # A step in three parts, so a disaggregated deployment spanning processes can launch both
    # slices' steps before reading either (serving/disagg.py).
    def launch(self) -> "Launched | None":
        """Schedules the next batch and dispatches its jitted step (without waiting for it)."""
        start = time.perf_counter()
        if self._resize_to is not None:
            self._continue_resize()
        batch = self.scheduler.schedule()
        if batch is None:
            return None
        arrays = self._arrays(batch)
        prepared = time.perf_counter()
        return Launched(batch, arrays, self._dispatch(batch, arrays), start, prepared)

    def _dispatch(self, batch: Batch, arrays: tuple) -> jax.Array:
        out, self.pool, self.expert_load, self.penalties.device = self._step(
            self.leaves, self.pool, self.expert_load, self.penalties.device, *arrays, absorbed=batch.kind == "decode")
        return out

    def retry_if_overflowed(self, launched: "Launched", host: np.ndarray) -> bool:
        """If rows did not fit the EP capacity bucket (the step's last value), re-dispatches the step
        at the next bucket and returns True. Re-running on the returned pool is safe: every cache
        row the step reads it first writes again."""
        if not host[-1]:
            return False
        self.net.set_expert_parallel(self.net.ep.escalated())
        self._use_step()
        self.counters["ep_overflow_retries"] += 1
        launched.out = self._dispatch(launched.batch, launched.arrays)
        return True

    def land(self, launched: "Launched", host: np.ndarray) -> list[Event]:
        """Advances the requests by the step's sampled tokens (host: the step's output, read back)."""
        batch, start = launched.batch, launched.start
        returned = time.perf_counter()
        events = self._advance(batch, host[:-1])
        done = time.perf_counter()
        elapsed = done - start
        self.counters[f"{batch.kind}_steps"] += 1
        self.counters[f"{batch.kind}_s"] += elapsed
        # host bookkeeping: building the batch before the jitted call and advancing requests after it
        self.last_step = {"kind": batch.kind, "wall_s": elapsed,
                          "host_s": (launched.prepared - start) + (done - returned)}
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
        new = rebalance_experts(weight, phy2log.shape[1], cfg.n_group, self.rebalancing.nodes(ranks), ranks)
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

    def _use_step(self) -> None:
        devices = (None,) if self.mesh is None else tuple(d.id for d in self.mesh.devices.flat)
        key = devices, None if self.net.ep is None else self.net.ep.level
        kernel = self.cfg.attention_kernel
        if kernel == "auto":
            kernel = "pallas" if jax.default_backend() == "gpu" else "xla"
        leaves, step = _compile_step(self.net, self.mesh, self.cache_mesh, kernel, self.penalties.slots)
        if key not in self._steps:  # compiled programs kept on disk between starts (serving/aot.py)
            identity = repr((nnx.graphdef(self.net), self.mesh, self.cache_mesh, kernel, self.penalties.slots))
            devices = jax.devices()[:1] if self.mesh is None else self.mesh.devices.flat
            self._steps[key] = AotStep(step, aot_directory(), program_key(identity, leaves), devices,
                                       out_tree=lambda args: jax.tree.structure((0, *args[1:4])))
        self.leaves, self._step = leaves, self._steps[key]

    # ---- disk tier of the prefix cache --------------------------------------------------------------
    def _open_disk(self, kv_dtype, width: int):
        from serving.kv_disk import DiskKVCache
        cfg, bs = self.net.config, self.cfg.block_size
        layout = f"block={bs} width={width} kv={jnp.dtype(kv_dtype).name}".encode()
        return DiskKVCache(self.cfg.disk_cache_dir, self.cfg.disk_cache_mb, model_identity(self.net) + layout,
                           (cfg.num_hidden_layers, bs, width), kv_dtype)

    def _fetch_from_disk(self, rank: int, hashes: list[bytes], blocks: list[int]) -> int:
        """Loads the leading blocks the disk holds into this rank's blocks; stops at the first missing
        or bad one (which the disk tier has counted and deleted: that block is recomputed)."""
        rows = []
        for h in hashes:
            block = self.disk.load(h)
            if block is None:
                break
            rows.append(block)
        if rows:
            K = pow2(len(rows))
            padded = np.stack(rows + [np.zeros_like(rows[0])] * (K - len(rows)), 1)  # [L, K, BS, C]
            self.pool = write_rank(self.pool, self.cache_mesh, {rank: (blocks[:len(rows)], padded)}, K)
            self.counters["disk_cached_prompt_tokens"] += len(rows) * self.cfg.block_size
        return len(rows)

    def _store_on_disk(self, req: Request) -> None:
        """Writes the request's full prompt blocks the disk lacks, behind the engine's back."""
        if self.disk is None:
            return
        new = [i for i, h in enumerate(req.hashes) if not self.disk.prefix([h])]
        if new:
            rows = read_rank(self.pool, self.cache_mesh, {req.rank: [req.blocks[i] for i in new]}, pow2(len(new)))
            self.disk.store_async([req.hashes[i] for i in new], rows[req.rank])

    # ---- elastic capacity ---------------------------------------------------------------------------
    def resize(self, devices) -> None:
        """Serve on these devices from now on (whole dp ranks: dp x tp devices, the current ranks'
        devices first, in order). Ranks that leave take no new requests; their requests move, KV
        blocks and all, to the staying ranks; the rest finish where they are, and the devices are
        released once those ranks are empty (on a later step). Added ranks take requests at once."""
        devices = list(devices)
        tp = self.mesh.shape["tp"]
        old = list(self.mesh.devices.flat)
        keep = min(len(devices), len(old))
        if len(devices) % tp or not devices or devices[:keep] != old[:keep] or len(set(devices)) < len(devices):
            raise ValueError(f"resize to {[d.id for d in devices]}: give whole ranks of tp={tp} devices, starting "
                             f"with the current ones in order {[d.id for d in old]}")
        dp = len(devices) // tp
        if self.net.moe_layers is not None and self.net.n_physical_experts % len(devices):
            raise ValueError(f"resize to {len(devices)} devices: the {self.net.n_physical_experts} physical "
                             f"experts per layer do not divide over EP{len(devices)}")
        self._resize_to = devices
        leaving = list(range(dp, self.ranks))
        moves = self.scheduler.migrations(leaving)
        if moves:
            self.pool = copy_blocks(self.pool, self.cache_mesh, self.pool, self.cache_mesh,
                                    [(req.rank, req.blocks, rank, blocks) for req, rank, blocks in moves])
            for req, rank, blocks in moves:
                self.scheduler.move(req, rank, blocks)
        self.resizes.append({"from_dp": self.ranks, "to_dp": dp, "migrated": len(moves),
                             "requested_at": time.perf_counter() - self.started})
        self._continue_resize()

    def resize_dp(self, dp: int, spare: list) -> None:
        """resize to dp ranks: leaving devices go to `spare`, new ranks come from it (in order)."""
        current = list(self.mesh.devices.flat)
        want = dp * self.mesh.shape["tp"]
        if dp < 1 or want - len(current) > len(spare):
            raise ValueError(f"resize the {self.role} engine to dp={dp}: needs {want} devices, "
                             f"{len(current)} held and {len(spare)} spare")
        if want < len(current):
            self.resize(current[:want])
            spare[:0] = current[want:]  # the most recently released are handed out first
        elif want > len(current):
            self.resize(current + spare[:want - len(current)])
            del spare[:want - len(current)]

    def _continue_resize(self) -> None:
        devices = self._resize_to
        dp = len(devices) // self.mesh.shape["tp"]
        if any(self.scheduler.running[dp:]) or (self.role == "prefill" and any(r.rank >= dp for r in self.outbox)):
            return  # leaving ranks still finish requests that found no room elsewhere
        started = time.perf_counter()
        mesh = make_mesh(dp, self.mesh.shape["tp"], devices)
        self._reshard_weights(mesh)
        L, _, BS, C = self.pool.shape
        shards = {s.device: s.data for s in self.pool.addressable_shards}
        self.pool = jax.make_array_from_single_device_arrays(
            (L, dp * self.blocks_per_rank, BS, C), NamedSharding(mesh, P(None, "dp")),
            [shards[d] if d in shards else jnp.zeros((L, self.blocks_per_rank, BS, C), self.pool.dtype, device=d)
             for d in mesh.devices.flat])
        self.expert_load = jax.device_put(np.zeros(self.expert_load.shape, np.int32), NamedSharding(mesh, P()))
        self._load_window.clear()
        self._load_seen = 0
        self.scheduler.resize(dp)
        now = time.perf_counter()
        self._device_seconds += (now - self._devices_since) * self.devices
        self.mesh, self.ranks, self.devices, self._devices_since = mesh, dp, mesh.size, now
        self.cache_mesh = mesh if mesh.size > 1 else None
        self.penalties.resize(dp, mesh)
        self._use_step()
        self._resize_to = None
        self.counters["resizes"] += 1
        self.resizes[-1].update(done_at=time.perf_counter() - self.started, reshard_s=time.perf_counter() - started)

    def _reshard_weights(self, mesh) -> None:
        """Every parameter onto the new mesh by the same logical-axis rules it was loaded with: the
        routed experts' physical slots spread over the new EP group, the rest replicated."""
        from sharding.ep import EPConfig
        from sharding.mesh import param_shardings
        state = nnx.state(self.net)
        shardings = nnx.to_pure_dict(param_shardings(state, mesh))
        nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state), shardings))
        nnx.update(self.net, state)
        ep = self.net.ep
        if mesh.size > 1:
            ep = dataclasses.replace(ep, mesh=mesh) if ep is not None else EPConfig(mesh=mesh)
            self.net.set_expert_parallel(ep)
        else:
            self.net.set_expert_parallel(None)

    def warmup(self) -> int:
        """Compiles every shape bucket on an all-padding batch (it writes nothing), so serving never
        compiles; returns the number of compilations this took."""
        before = self.compilations
        shapes = [("prefill", r, t) for r in self.cfg.prefill_rows for t in self.cfg.prefill_tokens
                  if self.role != "decode"]
        shapes += [("decode", b, 1) for b in self.cfg.decode_batch if self.role != "prefill"]
        for kind, rows, width in shapes:
            for blocks in self.context_buckets:
                B = rows * self.ranks
                arrays = (np.zeros((B, blocks), np.int32), np.zeros((B, width), np.int32),
                          np.full((B, width), -1, np.int32), np.zeros(B, np.int32),
                          sampling_arrays([None] * B, [0] * B, [0] * B, [None] * B, self.penalties.slots))
                out, self.pool, self.expert_load, self.penalties.device = self._step(
                    self.leaves, self.pool, self.expert_load, self.penalties.device, *arrays,
                    absorbed=kind == "decode")
        self.penalties.warm_up()
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
        params, seeds, counters, rows_slot = [None] * B, [0] * B, [0] * B, [None] * B
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
                if req.params.needs_table and pos + n >= len(req.prompt):  # it samples (not a middle chunk)
                    rows_slot[b] = self.penalties.slot(req, rank, self.requests.__contains__)
        return (table, tokens, positions, sample_at,
                sampling_arrays(params, seeds, counters, rows_slot, self.penalties.slots))

    def _advance(self, batch: Batch, host: np.ndarray) -> list[Event]:
        next_tokens, lp, top_ids, top_lps = unpack(host, self.net.config.vocab_size)
        rows_b = len(next_tokens) // self.ranks
        events, now = [], time.perf_counter()
        for rank, rows in enumerate(batch.rows):
            for (req, pos, n), slot in zip(rows, batch.slots[rank]):
                req.computed = pos + n
                if req.in_prefill:  # a middle chunk of a long prompt: its sample is not a token
                    continue
                if batch.kind == "prefill":
                    self.scheduler.register_prompt_blocks(req)
                    self._store_on_disk(req)
                    self.counters["cached_prompt_tokens"] += req.cached
                    req.first_token_at = now
                row = rank * rows_b + slot
                token = int(next_tokens[row])
                req.output.append(token)
                self.counters["generated_tokens"] += 1
                self.counters["kv_tokens_read"] += pos + n  # the context this token attended over
                reason = self._finish_reason(req, token)
                if reason or self.role == "prefill":
                    self.penalties.release(req.id)
                if reason:
                    self.scheduler.finish(req, reason)
                    self.counters["finished"] += 1
                    self.finished.append(self.requests.pop(req.id))
                elif self.role == "prefill":  # decode happens on the decode slice; the blocks stay until sent
                    self.scheduler.running[req.rank].remove(req)
                    self.outbox.append(req)
                logprobs = None if req.params.logprobs is None else \
                    [row_logprobs(req.params, token, lp[row], top_ids[row], top_lps[row])]
                events.append(Event(req, [token], reason is not None, logprobs))
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
        return sum(step._cache_size() for step in self._steps.values())

    def statistics_record(self, gpus_per_node: int = 8) -> dict:
        """The window served so far in the statistics-file form scripts/cost_report.py reads
        (serving/economics.py, docs/ECONOMICS.md)."""
        return statistics_record(self.stats(), gpus_per_node)

    @property
    def gpu_seconds(self) -> float:
        """Device-seconds held since the engine started, through every resize."""
        return self._device_seconds + (time.perf_counter() - self._devices_since) * self.devices

    def eplb_stats(self) -> dict:
        """Balancedness (max / mean GPU load, per MoE layer and overall) of the loads seen so far under
        the current placement, and the last live rebalance's before/after."""
        if self.net.ep is None or self.net.moe_layers is None or not self.expert_load.addressable_shards:
            return {}  # (no loads to read on a process that holds none of this engine's devices)
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
        c = summarize(self.counters, self.finished, self.gpu_seconds)
        c.update(
            running=sum(len(r) for r in self.scheduler.running), waiting=len(self.scheduler.waiting),
            dp=self.ranks, devices=self.devices,
            kv_blocks_total_per_rank=self.blocks_per_rank,
            kv_blocks_used=[p.used for p in self.scheduler.pools],
            kv_blocks_cached=[len(p.evictable) for p in self.scheduler.pools],
            balance={k: v.summary() for k, v in self.scheduler.balance.items()},
            disk=self.disk.stats if self.disk else None, resizes=self.resizes,
            compilations=self.compilations, ep_capacity_level=None if self.net.ep is None else self.net.ep.level,
            eplb=self.eplb_stats(), quantization=self.net.quantization, **parameter_bytes(self.net),
        )
        return c


def parameter_bytes(net) -> dict:
    """The weights on device: `parameter_bytes` counts each array once (one copy of a replicated
    weight; every physical expert slot), `parameter_bytes_per_device` the most any device holds."""
    per_device: collections.Counter = collections.Counter()
    for a in jax.tree.leaves(nnx.state(net, nnx.Param)):
        for shard in a.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
    return {"parameter_bytes": net.parameter_bytes, "parameter_bytes_per_device": max(per_device.values(), default=0)}


def summarize(counters: dict, finished, gpu_seconds: float) -> dict:
    """Counters -> the figures users and the cost report read (also over several engines' counters)."""
    c = dict(counters)
    done = [r for r in finished if r.first_token_at]
    ttft = [r.first_token_at - r.arrival for r in done]
    speed = [(len(r.output) - 1) / (r.finished_at - r.first_token_at) for r in done
             if len(r.output) > 1 and r.finished_at > r.first_token_at]
    c.update(
        cache_hit_rate=c["cached_prompt_tokens"] / max(c["prompt_tokens"], 1),
        input_tokens_cache_hit=c["cached_prompt_tokens"],
        input_tokens_cache_miss=c["prompt_tokens"] - c["cached_prompt_tokens"],
        average_kv_length_per_output_token=c["kv_tokens_read"] / max(c["generated_tokens"], 1),
        gpu_seconds=gpu_seconds,
        prefill_tokens_per_s=(c["prompt_tokens"] - c["cached_prompt_tokens"]) / max(c["prefill_s"], 1e-9),
        decode_tokens_per_s=c["generated_tokens"] / max(c["decode_s"], 1e-9),
        ttft_s=_percentiles(ttft), tokens_per_s_per_user=_percentiles(speed),
    )
    return c


def statistics_record(stats: dict, gpus_per_node: int = 8) -> dict:
    """Engine statistics -> one record of the statistics file scripts/cost_report.py reads."""
    return {"window_hours": max(stats["gpu_seconds"] / stats["devices"] / 3600, 1e-9), "gpus_per_node": gpus_per_node,
            "gpu_seconds": stats["gpu_seconds"], "input_tokens_cache_hit": stats["input_tokens_cache_hit"],
            "input_tokens_cache_miss": stats["input_tokens_cache_miss"], "output_tokens": stats["generated_tokens"]}


def gpu_sum(weight, phy2log, logcnt, ranks) -> list[float]:
    """Each GPU's load summed over layers: the report's per-GPU bars."""
    from sharding.eplb import gpu_loads
    return gpu_loads(weight, phy2log, logcnt, ranks).sum(0).tolist()


def _percentiles(values) -> dict:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def model_identity(net) -> bytes:
    """A digest of the model a KV block was computed by: its config, dtype and a sample of its
    weights (two models with one config differ there), so a disk block from another model is never
    taken for ours."""
    import hashlib
    import json
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(net.config.to_dict(), sort_keys=True).encode() + jnp.dtype(net.dtype).name.encode()
             + net.quantization.encode())  # FP8 GEMMs compute other KV rows than the dequantised model
    head = net.lm_head.weight if net.lm_head is not None else net.embed_tokens.weight
    for weight in (net.embed_tokens.weight, head, net.norm.weight):
        h.update(np.asarray(weight[...].addressable_data(0)[:64]).tobytes())
    return h.digest()
