"""The model runner: the device side of the engine.

It owns the weights (the flat list of arrays the jitted step takes), the paged KV pool, the
accumulated expert loads and the compiled steps, one per (devices, EP capacity level). It packs a
scheduled batch into bucketed arrays, dispatches the step, re-runs a step whose rows overflowed an
EP capacity bucket at the next level (`finish_steps`: the one overflow retry), brings the level
back down after a window of steps without an overflow (`CapacityWindow`), and warms up every shape
bucket at every capacity level, so serving never compiles.

The step it dispatches is one pure function (serving/step.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.overlap import balanced_slots
from serving.aot import AotStep, aot_directory, program_key
from serving.buckets import Buckets, bucket  # noqa: F401 - bucket: the scripts' import
from serving.input_batch import InputBatch
from serving.kv_cache import POOL_AXES, new_pool, read_rank, write_rank, zero_shard
from serving.request import Batch
from serving.step import build_step
from serving.penalties import PenaltyTable
from serving.sampling import sampling_arrays
from serving.structured import fill_masks
from serving.transfer import pack_rows
from serving.warmup import Warmup
from sharding.mesh import logical_sharding, logical_size, param_shardings


@dataclasses.dataclass
class Launched:
    """A dispatched step: its batch, the arrays it ran on, its output (still on device)."""
    batch: Batch
    arrays: tuple
    out: jax.Array
    start: float
    prepared: float


def finish_steps(runners: list, launched: list, read) -> list:
    """The one overflow retry. Reads the launched steps' outputs (read: their device outputs, None
    where nothing was launched -> host arrays) and re-runs each step that overflowed at its runner's
    next EP capacity level until none does. One runner (Engine.step), or both slices of a
    disaggregated deployment across processes, whose outputs one collective reads (serving/disagg.py)."""
    hosts = read([l.out if l else None for l in launched])
    while True:
        redo = [l is not None and r.retry_if_overflowed(l, h) for r, l, h in zip(runners, launched, hosts)]
        if not any(redo):
            return hosts
        again = read([l.out if x else None for l, x in zip(launched, redo)])
        hosts = [a if x else h for a, h, x in zip(again, hosts, redo)]


class CapacityWindow:
    """When a raised EP capacity level steps back down: after `window` steps in a row without an
    overflow. The window starts at dispatch.capacity_window and doubles (up to `growth` times that)
    each time an overflow comes back within a window of a step down, so a lasting skew stays at the
    raised level and a passing one pays a short window. A raised level costs every step it lasts
    (larger expert buckets, the widest page table: serving/buckets.py); a re-run costs one step."""

    def __init__(self, first: int, growth: int = 64):
        self.first, self.longest = first, first * growth
        self.window, self.clean, self.since_down = first, 0, None  # since_down: steps since the last step down

    def overflowed(self) -> None:
        soon = self.since_down is not None and self.since_down < self.window
        self.window = min(2 * self.window, self.longest) if soon else self.first
        self.clean, self.since_down = 0, None

    def landed(self, raised: bool) -> bool:
        """A step completed at a raised level or not -> whether the level steps down now."""
        if self.since_down is not None:
            self.since_down += 1
        if not raised:
            return False
        self.clean += 1
        if self.clean < self.window:
            return False
        self.clean = 0
        return True

    def stepped_down(self) -> None:
        self.since_down = 0


class ModelRunner:
    def __init__(self, net, deployment, mesh, counters: dict, role: str = "mixed", drafts: int = 0):
        """drafts: k, the MTP draft tokens per request and step (0: none); the MTP module's KV rows are
        one more layer of the pool."""
        cfg, serving = net.config, deployment.serving
        self.drafts = drafts
        layers = cfg.num_hidden_layers + (1 if drafts else 0)
        self.net, self.deployment, self.serving, self.counters = net, deployment, serving, counters
        self.context_len = serving.context_len(cfg.max_position_embeddings)
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv_dtype = {"auto": net.dtype, "bf16": jnp.bfloat16, "fp32": jnp.float32}[serving.kv_dtype]
        self.blocks_per_rank = serving.blocks_per_rank(layers, self.width,
                                                       jnp.dtype(self.kv_dtype).itemsize)
        # a row's page table: the context, but never more blocks than a rank holds (the scheduler
        # bounds a request's output by its rank's pool)
        self.max_blocks = min(math.ceil(self.context_len / serving.block_size), self.blocks_per_rank)
        self.buckets = Buckets(serving, drafts, self.max_blocks,  # the shape buckets (serving/buckets.py)
                               1 if net.ep is None else len(net.ep.capacity_factors))
        self.context_buckets = self.buckets.context
        self.warming: Warmup | None = None  # the last warm-up (its background thread, its progress)
        self._place(mesh)
        self.pool = new_pool(layers, self.ranks, self.blocks_per_rank, serving.block_size,
                             self.width, self.kv_dtype, mesh)
        moe = net.moe_layers
        self._load_shape = (0, 0) if moe is None else moe.mlp.phy2log.shape  # [MoE layers, P]
        self.reset_expert_load()
        # penalties / logit_bias rows: one per request that samples on a rank (a prefill slice's
        # requests leave after one step, so a batch's rows are enough there)
        slots = serving.prefill_rows[-1] if role == "prefill" else serving.decode_batch[-1]
        self.penalties = PenaltyTable(self.ranks, slots, cfg.vocab_size, mesh)
        self.role = role
        self.inputs = self._input_batch(mesh)
        # One jitted step per (devices, EP capacity level): a resize back to devices served before,
        # or a capacity level seen before, finds its compiled programs again.
        self._steps: dict[tuple, object] = {}
        self.capacity_window = CapacityWindow(self.deployment.capacity_window)
        self.mask_words = -(-cfg.vocab_size // 32)  # W: token-mask words per row
        self._use_step()

    def _input_batch(self, mesh) -> InputBatch:
        """Rows for the requests a rank runs at once (a prefill slice's: one batch's), on every rank."""
        per_rank = self.serving.prefill_rows[-1] if self.role == "prefill" else self.serving.decode_batch[-1]
        return InputBatch(self.ranks * per_rank, self.max_blocks, mesh)

    def _place(self, mesh) -> None:
        self.mesh = mesh
        self.ranks = 1 if mesh is None else logical_size(mesh, "batch")
        # a one-device mesh still fixes the arrays' layout (so warm-up and serving share compilations)
        # but needs no per-rank shard_map around cache reads and writes
        self.cache_mesh = mesh if mesh is not None and mesh.size > 1 else None
        self._free_masks: dict[int, jax.Array] = {}  # batch rows -> all-ones token masks kept on the device

    def reset_expert_load(self) -> None:
        """Tokens per physical expert slot [MoE layers, P], summed over steps (for EPLB and /metrics)."""
        sharding = logical_sharding(self.mesh) if self.mesh is not None else None
        self.expert_load = jax.device_put(np.zeros(self._load_shape, np.int32), sharding)

    def refresh_weights(self) -> None:
        """After the weights changed in place (EPLB moved experts): same tree, same compiled step."""
        self.leaves = jax.tree.leaves(nnx.state(self.net))

    def _key(self) -> tuple:
        """(devices, EP capacity level): what a compiled step is specific to."""
        devices = (None,) if self.mesh is None else tuple(d.id for d in self.mesh.devices.flat)
        return devices, None if self.net.ep is None else self.net.ep.level

    def _use_step(self) -> None:
        key = self._key()
        leaves, step, options = build_step(self.net, self.mesh, self.cache_mesh, self.penalties.slots, self.drafts)
        # the platform's XLA options (sharding/deployment.py: on GPU the latency-hiding scheduler, GEMMs
        # reading stacked weights in place), decided once per mesh, never by a global flag
        xla_options = self.deployment.xla_options(self.deployment.platform_for(self.mesh))
        if xla_options:
            options = dict(options, compiler_options=xla_options)
        if key not in self._steps:  # compiled programs kept on disk between starts (serving/aot.py)
            identity = repr((nnx.graphdef(self.net), self.mesh, self.cache_mesh, self.penalties.slots, self.drafts,
                             sorted(xla_options.items())))
            placed = jax.devices()[:1] if self.mesh is None else self.mesh.devices.flat
            self._steps[key] = AotStep(step, options, aot_directory(), program_key(identity, leaves), placed,
                                       out_tree=lambda args: jax.tree.structure((0, *args[1:5])))
        self.leaves, self._step = leaves, self._steps[key]

    @property
    def compilations(self) -> int:
        return sum(step.compilations for step in self._steps.values())

    @property
    def programs_loaded(self) -> int:
        """Compiled steps loaded from disk instead of compiled (serving/aot.py)."""
        return sum(step.loads for step in self._steps.values())

    # ---- one step ----------------------------------------------------------------------------------
    def pack(self, batch: Batch, live) -> tuple:
        """The batch as bucketed arrays: rows per rank (prefill_rows / decode_batch), tokens per row
        (prefill_tokens; decode: 1 + k, the last token and the drafts), page-table width (power-of-two
        block counts, covering the rows the MTP module drafts into).
        Rank r's rows are rows [r*b, (r+1)*b), which the mesh splits over the dp ranks.
        live(request id): still served here (PenaltyTable.slot reclaims the rows of the others)."""
        cfg = self.serving
        per_rank = max(len(rows) for rows in batch.rows)
        width = max(n for rows in batch.rows for _, _, n in rows)
        need = max(math.ceil((p + n + self.drafts) / cfg.block_size) for rows in batch.rows for _, p, n in rows)
        level = 0 if self.net.ep is None else self.net.ep.level
        _, rows_b, width, blocks = self.buckets.fit(batch.kind, per_rank, width, need, level)
        B = rows_b * self.ranks
        tokens = np.zeros((B, width), np.int32)
        positions = np.full((B, width), -1, np.int32)
        page_rows = np.full(B, self.inputs.dump, np.int32)  # each row's page table: its request's input-batch row
        sample_at, n_drafts = np.zeros(B, np.int32), np.zeros(B, np.int32)
        next_tokens = np.full((B, width), -1, np.int32)  # the token after each position, where known
        reads = np.full((B, 2), (-1, self.inputs.dump), np.int32)  # token slot read (-1: none), written
        params, seeds, counters, rows_slot = [None] * B, [0] * B, [0] * B, [None] * B
        guided = []  # (row, guide, drafts) of the rows a grammar or min_tokens constrains
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
                held = min(len(req.blocks), blocks)
                if batch.kind == "decode":  # the last token, then its drafts (the next token: this step's)
                    if pos < len(req.prompt) + len(req.output):
                        tokens[b, :n] = req.tokens(pos, pos + 1) + req.drafts
                    else:  # sampled by the step still running (async scheduling): read on the device
                        tokens[b, 1:n] = req.drafts
                        reads[b, 0] = self.inputs.slot(req.id)
                    n_drafts[b] = n - 1
                else:
                    tokens[b, :n] = req.tokens(pos, pos + n)
                    known = req.tokens(pos + 1, pos + n + 1)
                    next_tokens[b, :len(known)] = known
                # rows past what the request holds (a window running past its context) are not written
                positions[b, :n] = np.where(np.arange(pos, pos + n) < held * cfg.block_size,
                                            np.arange(pos, pos + n), -1)
                page_rows[b] = self.inputs.page_row(req.id, req.blocks)
                sample_at[b] = n - 1
                params[b], seeds[b], counters[b] = req.params, req.seed, pos + n
                samples = pos + n >= len(req.prompt) + len(req.output)  # not a middle chunk, nor a preempted request's recompute
                if samples:
                    reads[b, 1] = page_rows[b]
                if req.params.needs_table and samples:
                    rows_slot[b] = self.penalties.slot(req, rank, live)
                if req.guide is not None and samples:
                    guided.append((b, req.guide, req.drafts if batch.kind == "decode" else []))
        mask, rows_guided = fill_masks(guided, B, 1 + self.drafts, self.mask_words)
        return (blocks, page_rows, tokens, positions, sample_at, n_drafts, next_tokens, reads,
                sampling_arrays(params, seeds, counters, rows_slot, self.penalties.slots, self._mask(B, mask),
                                rows_guided))

    def _mask(self, B: int, host: np.ndarray | None) -> jax.Array:
        """The step's token masks on the device, each rank's rows on its own devices: a batch without a
        constrained row reuses a device-resident all-ones mask (nothing to send)."""
        sharding = logical_sharding(self.mesh, "batch") if self.mesh is not None else None
        if host is not None:
            return jax.device_put(host, sharding)
        if B not in self._free_masks:
            self._free_masks[B] = jax.device_put(np.full((B, 1 + self.drafts, self.mask_words), -1, np.int32),
                                                 sharding)
        return self._free_masks[B]

    def _call(self, kind: str, arrays: tuple, fresh: bool = False) -> tuple[tuple, dict]:
        """The step's (args, static arguments) for a packed batch: its host arrays as one transfer
        (serving/transfer.py)."""
        blocks, *arrays = arrays  # (the page-table width bucket: static)
        host_rows, host_kept, layout = pack_rows(arrays, arrays[0].shape[0])
        return ((self.leaves, self.pool, self.expert_load, self.penalties.device, self.inputs.tokens,
                 self.inputs.pages, host_rows, host_kept, np.bool_(fresh)),
                {"absorbed": kind == "decode", "blocks": blocks, "layout": layout})

    def dispatch(self, kind: str, arrays: tuple, fresh: bool = False) -> jax.Array:
        """Runs the step on these arrays without waiting; returns its output (tokens + overflow flag).
        fresh: a re-run, which ignores the flag an overflowed step before it left. At a raised EP
        capacity level every batch runs the widest page table (serving/buckets.py), whichever level
        it was packed at (a re-run, or a step dispatched before the level rose)."""
        if self.net.ep is not None and self.net.ep.level:
            arrays = self.buckets.widen(arrays)
        self.inputs.write()  # the page-table entries the packed batches added
        args, static = self._call(kind, arrays, fresh)
        out, self.pool, self.expert_load, self.penalties.device, self.inputs.tokens = self._step(*args, **static)
        return out

    def retry_if_overflowed(self, launched: Launched, host: np.ndarray) -> bool:
        """If rows did not fit the EP capacity bucket (the step's last value: 1), re-dispatches the
        step at the next level and returns True; a step that ran after one that overflowed (2) runs
        again at the same level. Re-running on the returned pool is safe: every cache row the step
        reads it first writes again."""
        if not host[-1]:
            return False
        if host[-1] & 1:
            blocks, _, tokens = launched.arrays[:3]
            shape = (launched.batch.kind, tokens.shape[0] // self.ranks, tokens.shape[1], blocks)
            self._set_level(self.buckets.retry_level(shape, self.net.ep.level))  # (the next level, once warmed up)
            self.capacity_window.overflowed()
            self.counters["ep_overflow_retries"] += 1
        launched.out = self.dispatch(launched.batch.kind, launched.arrays, fresh=True)
        return True

    def landed(self) -> None:
        """After a step completed: a window of steps without overflow at a raised capacity level brings
        the level down one (the next overflow, if the load is still skewed, raises it again:
        CapacityWindow)."""
        ep = self.net.ep
        if ep is None or not self.capacity_window.landed(raised=ep.level > 0):
            return
        down = self.buckets.down_level(ep.level)  # (the one below, once warmed up)
        if down < ep.level:
            self._set_level(down)
            self.capacity_window.stepped_down()
            self.counters["ep_capacity_steps_down"] += 1

    def _set_level(self, level: int) -> None:
        """Steps at this capacity level from now on. Stepping down releases the programs of the level
        left (saved ones load again when needed: XLA:CPU's memory maps cap the programs a process
        holds, serving/aot.py), so the lowest level's stay loaded and a raised level's while in use."""
        ep = self.net.ep
        if not 0 <= level < len(ep.capacity_factors):
            raise RuntimeError(f"EP capacity level {level} does not exist (the last bucket cannot overflow)")
        left = self._step
        self.net.set_expert_parallel(dataclasses.replace(ep, level=level))
        self._use_step()
        if level < ep.level:
            left.release()

    # ---- warm-up -----------------------------------------------------------------------------------
    def warmup(self, kinds: tuple[str, ...], background: bool = False) -> int:
        """Compiles every shape bucket of these step kinds at every EP capacity level a step can reach,
        on all-padding batches (they write nothing), so serving never compiles; returns the number
        of compilations this took. background: only the cover-all shapes now, the rest on a thread
        while serving (serving/warmup.py; one process only: a multi-process job's processes must run
        the same shapes)."""
        if self.warming is not None:
            self.warming.stop()
        self.warming = Warmup(self, kinds)
        compiled = self.warming.run(background and jax.process_count() == 1)
        self.warming.start()
        return compiled

    def warm_copies(self) -> None:
        """Compiles the block copies (serving/kv_cache.py: a hand-over out of or into this pool, a
        resize's migration) at every power-of-two width a request's blocks can take, reading and
        writing no block, so neither compiles while serving."""
        K = 1
        while True:
            read_rank(self.pool, self.cache_mesh, dict.fromkeys(range(self.ranks), []), K)
            self.pool = write_rank(self.pool, self.cache_mesh, {}, K)
            if K >= self.max_blocks:
                return
            K *= 2

    # ---- elastic capacity --------------------------------------------------------------------------
    def move_to(self, mesh) -> None:
        """Serve on this mesh from now on: every parameter re-placed by the same logical-axis rules it
        was loaded with (routed experts' slots spread over the new EP group, the rest replicated),
        the pool rebuilt from the staying devices' shards (no copy) plus zero shards for new ones."""
        if self.warming is not None:  # its shapes are the old mesh's: the new one compiles on first use
            self.warming.stop()
            self.buckets.ready = None
        state = nnx.state(self.net)
        shardings = nnx.to_pure_dict(param_shardings(state, mesh))
        nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state), shardings))
        nnx.update(self.net, state)
        ep = self.net.ep
        if mesh.size > 1:
            self.net.set_expert_parallel(dataclasses.replace(ep, mesh=mesh) if ep is not None
                                         else self.deployment.ep_config(mesh, self.net.kernels))
        else:
            self.net.set_expert_parallel(None)
        L, _, BS, C = self.pool.shape
        shards = {s.device: s.data for s in self.pool.addressable_shards}
        ranks = logical_size(mesh, "batch")
        self.pool = jax.make_array_from_single_device_arrays(
            (L, ranks * self.blocks_per_rank, BS, C), logical_sharding(mesh, *POOL_AXES),
            [shards[d] if d in shards else zero_shard(d, (L, self.blocks_per_rank, BS, C), self.pool.dtype)
             for d in mesh.devices.flat])
        self._place(mesh)
        self.penalties.resize(self.ranks, mesh)
        self.inputs = self._input_batch(mesh)
        self.reset_expert_load()
        self._use_step()
        for key, step in self._steps.items():  # the meshes left: their saved programs load again if needed
            if key[0] != self._key()[0]:
                step.release()
