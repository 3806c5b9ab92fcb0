"""Prefill/decode disaggregation: a prefill slice and a decode slice of the devices, each an
Engine with its own mesh, EP size, redundant experts and buckets, and the KV hand-over between them.

A request is prefilled on the prefill slice (the prefill balancer picks its rank; its prefix may
come from the device or disk cache there). Its first token is sampled there; then the decode
balancer picks a decode rank, the request's latent KV blocks are gathered on the prefill device and
`jax.device_put` onto the decode device, and the request decodes on the decode slice. Nothing in
the hand-over waits for a device: the copies are queued behind the prefill step that wrote the
blocks and ahead of the decode step that reads them, and the two slices step side by side.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from serving.engine import Engine, build_engine
from serving.kv_cache import copy_blocks, copy_round, pow2, read_rank, write_rank, zeros_on
from serving.request import Event, Request
from serving.runner import finish_steps
from serving.sampling import SamplingParams, row_width
from serving.stats import statistics_record, summarize, xla_compilations

# counters that belong to requests as a whole: kept by the prefill slice, where requests arrive
ARRIVAL_COUNTERS = ("requests", "rejected", "prompt_tokens", "cached_prompt_tokens", "disk_cached_prompt_tokens")


def build(path, deployment, dtype, devices=None, quantization=None) -> "DisaggEngine":
    """Loads the checkpoint once per slice, each onto its own devices with its own deployment."""
    devices = list(jax.devices() if devices is None else devices)
    n_prefill, need = deployment.prefill.ep_size, deployment.devices
    if need > len(devices):
        raise ValueError(f"{deployment.source}: needs {need} devices ({n_prefill} prefill + "
                         f"{need - n_prefill} decode), only {len(devices)} available")
    return DisaggEngine(build_engine(path, deployment.prefill, dtype, devices[:n_prefill], "prefill", quantization),
                        build_engine(path, deployment.decode, dtype, devices[n_prefill:need], "decode", quantization),
                        spare_devices=devices[need:])


class DisaggEngine:
    """The Engine interface (add_request / step / abort / stats / warmup / resize) over two slices."""

    def __init__(self, prefill: Engine, decode: Engine, spare_devices=()):
        if prefill.role != "prefill" or decode.role != "decode":
            raise ValueError("a disaggregated engine needs a prefill-role and a decode-role engine")
        layout = [(e.pool.dtype, e.pool.shape[0], e.pool.shape[2:]) for e in (prefill, decode)]
        if layout[0] != layout[1]:
            raise ValueError(f"the prefill and decode slices must share one KV layout (dtype, layers, block "
                             f"size, width) for the hand-over; got {layout[0]} and {layout[1]}")
        if prefill.drafts != decode.drafts:  # the prefill slice drafts the first tokens the decode slice verifies
            raise ValueError(f"the prefill and decode slices must draft as many MTP tokens (speculative."
                             f"num_tokens); got {prefill.drafts} and {decode.drafts}")
        self.prefill, self.decode = prefill, decode
        self.spare = list(spare_devices)  # devices neither slice uses now (elastic capacity)
        self.net = prefill.net  # tokenizer-side facts (vocabulary, bos/eos) are the model's
        self.context_len = min(prefill.context_len, decode.context_len)
        self.handover = {"requests": 0, "blocks": 0, "waited_for_room": 0, "s": 0.0}
        self._beside = ThreadPoolExecutor(1, thread_name_prefix="decode-slice")
        devices = [*prefill.mesh.devices.flat, *decode.mesh.devices.flat]
        self.across = Across(prefill, decode) if len({d.process_index for d in devices}) > 1 else None

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if request_id is not None and request_id in self.decode.requests:  # the prefill slice checks its own
            raise ValueError(f"request {request_id}: id already in use")
        req = self.prefill.add_request(prompt, params, request_id)
        need = self.decode.scheduler.blocks_needed(req)
        if need > self.decode.scheduler.blocks_per_rank:  # it could be prefilled but never decoded
            self.prefill.abort(req.id)
            raise ValueError(f"request {req.id}: needs {need} KV blocks, more than a decode rank's pool of "
                             f"{self.decode.scheduler.blocks_per_rank} (raise the decode slice's serving.kv_cache_mb)")
        return req

    def abort(self, request_id: str) -> None:
        if request_id in self.prefill.requests:  # prefilling, or prefilled and waiting for a decode rank
            self.prefill.abort(request_id)
        else:
            self.decode.abort(request_id)

    @property
    def idle(self) -> bool:
        return self.prefill.idle and self.decode.idle

    @property
    def requests(self) -> dict:
        return {**self.prefill.requests, **self.decode.requests}

    @property
    def grammars(self):
        """Structured outputs compile where requests enter: the prefill slice (serving/structured.py)."""
        return self.prefill.grammars

    @property
    def seeds(self):
        return self.prefill.seeds

    @seeds.setter
    def seeds(self, rng) -> None:  # (requests get their seed where they enter: the prefill slice)
        self.prefill.seeds = rng

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One step of each slice, side by side, then the hand-over of every prompt the prefill slice
        finished. In one process the decode slice steps in a thread (JAX releases the GIL while a step
        runs); across processes each process computes only its own slice's steps, and the sampled
        tokens of both reach every process through one small collective over both slices."""
        if self.across is not None:
            events = self.across.step()
        else:
            beside = None if self.decode.idle else self._beside.submit(self.decode.step)
            events = self.prefill.step()
            if beside is not None:
                events += beside.result()
        self._hand_over()
        return events

    def _hand_over(self) -> None:
        start = time.perf_counter()
        sent = []
        for req in self.prefill.outbox:  # FIFO: a request that finds no room holds back the later ones
            source = req.rank, req.blocks
            if not self.decode.receive(req):  # on success: req.rank, req.blocks are the decode side's
                self.handover["waited_for_room"] += 1
                break
            sent.append((req, *source))
        if not sent:
            return
        bs = self.prefill.cfg.block_size
        n = [-(-req.computed // bs) for req, _, _ in sent]  # blocks holding the prompt's KV rows
        moves = [(rank, blocks[:k], req.rank, req.blocks[:k]) for (req, rank, blocks), k in zip(sent, n)]
        # queued behind the prefill step that wrote the blocks, ahead of any step that reuses them
        if self.across is not None:
            self.across.copy(moves)
        else:
            p, d = self.prefill.runner, self.decode.runner
            d.pool = copy_blocks(p.pool, p.cache_mesh, d.pool, d.cache_mesh, moves)
        for req, rank, blocks in sent:
            self.prefill.scheduler.handed_over(req, rank, blocks)
        self.handover["requests"] += len(sent)
        self.handover["blocks"] += sum(n)
        self.handover["s"] += time.perf_counter() - start

    def warmup(self, background: bool = False) -> int:
        """Every shape bucket of both slices, now (background is not taken: the slices' steps launch
        together, and across processes must run the same shapes)."""
        compiled = self.prefill.warmup() + self.decode.warmup()  # (each warms its block copies too)
        if self.across is not None:
            self.across.warmup()
        return compiled

    @property
    def compilations(self) -> int:
        return self.prefill.compilations + self.decode.compilations

    @property
    def programs_loaded(self) -> int:
        return self.prefill.programs_loaded + self.decode.programs_loaded

    # ---- elastic capacity --------------------------------------------------------------------------
    def resize(self, prefill: int | None = None, decode: int | None = None) -> None:
        """New dp sizes for the slices (None: unchanged). A shrinking slice moves its leaving ranks'
        requests to its staying ranks and returns the devices to the spare pool; a growing one takes
        spare devices."""
        if self.across is not None:
            raise ValueError("resizing a disaggregated deployment that spans processes is not supported yet")
        for engine, dp in ((self.prefill, prefill), (self.decode, decode)):
            if dp is not None:
                engine.resize_dp(dp, self.spare)

    # ---- statistics --------------------------------------------------------------------------------
    @property
    def counters(self) -> dict:
        p, d = self.prefill.counters, self.decode.counters
        merged = {k: p[k] + d[k] for k in p if k not in ARRIVAL_COUNTERS}
        merged.update({k: p[k] for k in ARRIVAL_COUNTERS})
        return merged

    def stats(self) -> dict:
        prefill, decode = self.prefill.stats(), self.decode.stats()
        out = summarize(self.counters, list(self.prefill.finished) + list(self.decode.finished),
                        self.prefill.gpu_seconds + self.decode.gpu_seconds)
        out.update(running=prefill["running"] + decode["running"] + len(self.prefill.outbox),
                   waiting=prefill["waiting"], devices=self.prefill.devices + self.decode.devices,
                   balance={**{k: v for k, v in prefill["balance"].items() if k.startswith("prefill")},
                            **{k: v for k, v in decode["balance"].items() if k.startswith("decode")}},
                   handover=dict(self.handover), spare_devices=len(self.spare), prefill=prefill, decode=decode,
                   # per dp rank, prefill slice's ranks first (the metrics endpoint's dp_rank labels)
                   kv_blocks_used=prefill["kv_blocks_used"] + decode["kv_blocks_used"],
                   kv_blocks_cached=prefill["kv_blocks_cached"] + decode["kv_blocks_cached"],
                   kv_blocks_total_per_rank=max(prefill["kv_blocks_total_per_rank"],
                                                decode["kv_blocks_total_per_rank"]),
                   compilations=self.compilations, xla_compilations=xla_compilations(), eplb=decode["eplb"],
                   parameter_bytes=prefill["parameter_bytes"] + decode["parameter_bytes"],  # each slice holds a copy
                   parameter_bytes_per_device=max(prefill["parameter_bytes_per_device"],
                                                  decode["parameter_bytes_per_device"]))
        return out

    @property
    def expert_load(self):
        """The decode slice's tokens per physical expert (where most tokens are routed): for metrics."""
        return self.decode.expert_load

    def statistics_record(self, gpus_per_node: int = 8) -> dict:
        return statistics_record(self.stats(), gpus_per_node)


class Across:
    """The two collectives a disaggregated deployment needs when its slices live in different
    processes (jax.device_put cannot cross processes on every backend; a collective can): over a
    1-D mesh of both slices' devices, (1) the slices' step outputs, replicated to every process so
    that each runs the same host loop, and (2) KV rows, ppermute'd from prefill to decode ranks.
    Both slices must be tp = 1 (one device per dp rank)."""

    def __init__(self, prefill: Engine, decode: Engine):
        if prefill.mesh.size != prefill.ranks or decode.mesh.size != decode.ranks:
            raise ValueError("a disaggregated deployment across processes needs tp = 1 in both slices")
        self.prefill, self.decode = prefill.runner, decode.runner
        self.mesh = Mesh(np.array([*prefill.mesh.devices.flat, *decode.mesh.devices.flat]), ("all",))
        self.n_prefill = prefill.mesh.size
        rows = max(prefill.cfg.prefill_rows[-1] * prefill.ranks, decode.cfg.decode_batch[-1] * decode.ranks)
        self.engines = prefill, decode
        # the longest step output: each row's token and logprob data, then the overflow flag
        self.width = rows * row_width(prefill.net.config.vocab_size, prefill.drafts) + 1

    def _local(self):
        return [(i, d) for i, d in enumerate(self.mesh.devices.flat) if d.process_index == jax.process_index()]

    def _global(self, per_device, shape, dtype) -> jax.Array:
        return jax.make_array_from_single_device_arrays((self.mesh.size, *shape),
                                                        NamedSharding(self.mesh, P("all")), per_device, dtype=dtype)

    def read(self, outs: list) -> list:
        """Each slice's step output (a device array replicated over its slice, or None) -> host arrays,
        the same on every process."""
        arrays = []
        for i, d in self._local():
            out = outs[0 if i < self.n_prefill else 1]
            if out is None:
                arrays.append(zeros_on(d, (1, self.width), np.int32))
            else:
                mine = {s.device: s.data for s in out.addressable_shards}[d]
                arrays.append(jnp.pad(mine, (0, self.width - out.shape[0]))[None])
        host = np.asarray(_replicate(self._global(arrays, (self.width,), np.int32), self.mesh))
        return [None if o is None else host[row, :o.shape[0]] for o, row in zip(outs, (0, self.n_prefill))]

    def step(self) -> list[Event]:
        engines = self.engines
        launched = [(e.launch() or [None])[0] for e in engines]  # (a slice's step is one program: its role's)
        hosts = finish_steps([e.runner for e in engines], launched, self.read)
        return [event for e, l, h in zip(engines, launched, hosts) if l for event in e.land([l], [h])]

    def warmup(self) -> None:
        """Compiles the cross-process send at every power-of-two block width a hand-over can take."""
        L, _, BS, C = self.decode.pool.shape
        K = 1
        while True:
            arrays = [zeros_on(d, (1, L, K, BS, C), self.decode.pool.dtype) for _, d in self._local()]
            pairs = np.full((self.mesh.size, 2), -1, np.int32)
            jax.block_until_ready(_send(self._global(arrays, (L, K, BS, C), self.decode.pool.dtype), pairs, self.mesh))
            if K >= self.prefill.max_blocks:
                return
            K *= 2

    def copy(self, moves) -> None:
        """Like kv_cache.copy_blocks from the prefill pool to the decode pool, rows crossing processes
        by one ppermute per round (a round reads each prefill rank and writes each decode rank once)."""
        pool = self.decode.pool
        L, _, BS, C = pool.shape
        while moves:
            batch, moves = copy_round(moves)
            K = pow2(max(len(m[1]) for m in batch))
            rows = read_rank(self.prefill.pool, self.prefill.cache_mesh, {m[0]: m[1] for m in batch}, K)
            arrays = [rows[i][None] if i in rows else zeros_on(d, (1, L, K, BS, C), pool.dtype)
                      for i, d in self._local()]  # (union index i < n_prefill is prefill rank i)
            # the round's pairing as data (one program for every pairing): per union device, the device
            # its rows go to and the device its rows come from (-1: none)
            pairs = np.full((self.mesh.size, 2), -1, np.int32)
            for src, _, dst, _ in batch:
                pairs[src, 0], pairs[self.n_prefill + dst, 1] = self.n_prefill + dst, src
            sent = _send(self._global(arrays, (L, K, BS, C), pool.dtype), pairs, self.mesh)
            got = {s.device: s.data[0] for s in sent.addressable_shards}
            decode_devices = list(self.decode.mesh.devices.flat)
            pool = write_rank(pool, self.decode.cache_mesh,
                              {dst: (blocks, got.get(decode_devices[dst])) for _, _, dst, blocks in batch}, K)
        self.decode.pool = pool


@functools.partial(jax.jit, static_argnames=("mesh",))
def _replicate(x, mesh):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _send(x, pairs, mesh):
    """x [N, ...]: one slab per device of the 1-D mesh; pairs int32[N, 2]: per device where its slab
    goes and where the slab it receives comes from (-1: none) -> [N, ...], each device's received slab
    (zeros if none). A permutation given as data, so any pairing of ranks runs this one program: a
    ppermute's pairs are static (one program per pairing: compiles while serving). One all_to_all in
    which each device fills only its destination's row: the wire carries N slabs per device where a
    ppermute carries one (XLA:CPU implements no ragged_all_to_all, which would send the slab alone)."""
    def local(a, pair):  # a [1, ...], pair [1, 2]
        n = mesh.size
        to = (jnp.arange(n) == pair[0, 0]).reshape((n,) + (1,) * (a.ndim - 1))
        got = jax.lax.all_to_all(jnp.where(to, a, jnp.zeros_like(a)), "all", 0, 0, tiled=True)  # [n, ...]: row j from j
        mine = jax.lax.dynamic_index_in_dim(got, jnp.maximum(pair[0, 1], 0), keepdims=True)
        return jnp.where(pair[0, 1] >= 0, mine, jnp.zeros_like(mine))
    return jax.shard_map(local, mesh=mesh, in_specs=(P("all"), P("all")), out_specs=P("all"))(x, pairs)
