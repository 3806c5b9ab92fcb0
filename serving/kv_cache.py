"""The paged latent KV cache: a device pool of fixed-size blocks per dp rank, page tables per
request, and a prefix cache of full blocks keyed by a hash chain of their tokens.

Axis legend: L layers, R dp ranks, NB blocks per rank, BS tokens per block, C = 512 + 64 latent
and rope values per token (DeepSeek-V3), B batch rows, MB blocks per row (its page table).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from sharding.mesh import logical_sharding, logical_size, logical_to_spec

# Logical axes (sharding/mesh.py's rule table places them): the pool [L, R * NB, BS, C] is split
# over its blocks, a batch [B, ...] over its rows, both by dp rank.
POOL_AXES = ("layers", "kv_blocks")
POOL, ROWS, REPLICATED = logical_to_spec(POOL_AXES), logical_to_spec(("batch",)), logical_to_spec(())


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedCache:
    """What attention sees during one engine step (model.cache.DenseCache's interface).

    Rank r's rows of the batch (B / R contiguous rows) address only rank r's blocks, by local id,
    so reads and writes stay on the device that holds them (a shard_map over the dp ranks)."""
    pool: jax.Array  # [L, R * NB, BS, C], split over dp ranks on axis 1 (POOL_AXES)
    page_table: jax.Array  # int32[B, MB], local block ids (unused entries: any block, masked by position)
    mesh: Any = dataclasses.field(default=None, metadata={"static": True})
    # the decode kernel's KV split for these rows (with_plan), made once per step for every layer; each
    # rank's, stacked (a plan per rank: the ranks' rows and lengths differ)
    plan: Any = None
    part_plans: Any = None  # (plan of micro-batch 0, of 1) when the step runs two (model/overlap.py Part.view)
    in_place_decode: ClassVar[bool] = True  # absorbed_context: the paged MLA kernel reads the pages

    def _per_rank(self, fn, out_spec, *args):
        if self.mesh is None:
            return fn(*args)
        specs = (POOL, ROWS) + (ROWS,) * len(args[2:-1]) + (REPLICATED,)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)

    def write(self, layer, slots, rows) -> "PagedCache":
        """rows [B, S, C] at positions slots int32[B, S] (-1: padding, not written)."""
        def local(pool, table, slots, rows, layer):
            n_blocks, block = pool.shape[1], pool.shape[2]
            blk = jnp.take_along_axis(table, jnp.maximum(slots, 0) // block, axis=1)
            blk = jnp.where(slots < 0, n_blocks, blk)  # out of range: dropped
            return pool.at[layer, blk, slots % block].set(rows.astype(pool.dtype), mode="drop")
        pool = self._per_rank(local, POOL, self.pool, self.page_table, slots, rows, layer)
        return dataclasses.replace(self, pool=pool)

    @property
    def max_len(self) -> int:
        return self.page_table.shape[1] * self.pool.shape[2]

    @property
    def block_size(self) -> int:
        return self.pool.shape[2]

    @property
    def dtype(self):
        return self.pool.dtype

    def absorbed_context(self, layer, q_latent, q_pe, lengths, scale: float, attend) -> jax.Array:
        """Decode attention read straight from the pages: q_latent [B, H, R], q_pe [B, H, P], lengths
        int32[B] -> context [B, H, R] (before w_v), each rank over its own blocks. attend: the
        deployment's decode kernel, attend(q_latent, q_pe, pool [NB, BS, C], page_table, lengths, scale,
        plan) with the rank's plan (with_plan) or None (model/attention.py: MLA.attend_in_cache)."""
        def local(pool, table, q_latent, q_pe, lengths, plan, layer):
            # every layer's blocks as one [L * NB, BS, C] pool (a free reshape) and the table offset to
            # this layer's: pool[layer] with a traced layer would copy the layer's whole pool
            L, NB, BS, C = pool.shape
            return attend(q_latent.astype(pool.dtype), q_pe.astype(pool.dtype), pool.reshape(L * NB, BS, C),
                          table + layer * NB, lengths, scale, plan)
        return self._per_rank(local, ROWS, self.pool, self.page_table, q_latent, q_pe, lengths, self.plan, layer)

    def with_plan(self, lengths, make_plan, parts: tuple = ()) -> "PagedCache":
        """The cache with each rank's plan for its rows at these lengths int32[B] (make_plan: a rank's
        lengths -> its plan), and one for each micro-batch's rows at theirs (parts: their lengths), computed
        here once, before the layer loop (inside it XLA would not hoist it: the plan's searches are loops
        of their own)."""
        def plan(lengths):
            return self._per_rank(lambda pool, table, lengths, _: make_plan(lengths), ROWS, self.pool,
                                  self.page_table, lengths, jnp.int32(0))
        return dataclasses.replace(self, plan=plan(lengths), part_plans=tuple(map(plan, parts)) or None)

    def select_rows(self, pick, plan=None) -> "PagedCache":
        """A view of some batch rows: pick maps the page table [B, MB] to the rows wanted (reads only; a
        plan made for all rows does not hold for the view: `plan` is the view's own, if made)."""
        return dataclasses.replace(self, page_table=pick(self.page_table), plan=plan, part_plans=None)

    def read(self, layer) -> jax.Array:
        """-> [B, MB * BS, C]: each row's blocks in position order."""
        def local(pool, table, layer):
            rows = pool[layer, table]  # [b, MB, BS, C]
            return rows.reshape(rows.shape[0], -1, rows.shape[-1])
        return self._per_rank(local, ROWS, self.pool, self.page_table, layer)


def new_pool(layers: int, ranks: int, blocks_per_rank: int, block_size: int, width: int, dtype, mesh) -> jax.Array:
    shape = (layers, ranks * blocks_per_rank, block_size, width)
    if mesh is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=logical_sharding(mesh, *POOL_AXES))()


def block_hashes(tokens, block_size: int) -> list[bytes]:
    """Hash chain over full blocks: a block's key covers every token before it too."""
    out, prev = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = np.asarray(tokens[start:start + block_size], np.int64).tobytes()
        prev = hashlib.blake2b(prev + chunk, digest_size=16).digest()
        out.append(prev)
    return out


class BlockPool:
    """Host bookkeeping for one dp rank's blocks: reference counts, free list, prefix cache.

    A block whose last reference is released stays in the prefix cache (if it holds a full,
    hashed block) until memory is needed; the least recently released goes first."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = np.zeros(num_blocks, np.int32)
        self.free = collections.deque(range(num_blocks))
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    def match(self, hashes: list[bytes]) -> list[int]:
        """The longest cached prefix of these block hashes, as block ids."""
        blocks = []
        for h in hashes:
            if h not in self.by_hash:
                break
            blocks.append(self.by_hash[h])
        return blocks

    def acquire(self, blocks: list[int]) -> None:
        for b in blocks:
            self.evictable.pop(b, None)
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.evictable.popitem(last=False)
                del self.by_hash[self.hash_of.pop(b)]
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            assert self.refs[b] >= 0, f"block {b} released twice"
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def register(self, block: int, h: bytes) -> None:
        """Makes a filled block findable by its hash (first writer wins)."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h


# ---- moving blocks between pools: hand-over (disaggregation), migration (resize), disk tier --------
# A read gathers blocks of some ranks into one [L, K, BS, C] array per rank, on its device; a write
# scatters such arrays (from any device, or host numpy from disk) into ranks' blocks. Both are one
# jitted per-rank gather/scatter over the whole pool, dispatched without waiting, so a prefill slice
# never waits for the decode slice it hands over to.

def rank_devices(pool: jax.Array, mesh) -> list[list]:
    """Each dp rank's devices (one per tp replica of the pool's rank slice)."""
    if mesh is None:
        return [list(pool.devices())]
    return [list(row) for row in mesh.devices.reshape(logical_size(mesh, "kv_blocks"), -1)]


def pow2(n: int) -> int:
    """Block-count widths of copies are powers of two: few shapes, so few compilations."""
    return 1 << max(0, n - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("mesh",))
def _gather(pool, idx, mesh):  # idx int32[R, K] local ids -> [L, R * K, BS, C]
    if mesh is None:
        return pool[:, idx[0]]
    return jax.shard_map(lambda p, i: p[:, i[0]], mesh=mesh, in_specs=(POOL, ROWS), out_specs=POOL,
                         check_vma=False)(pool, idx)


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("pool",))
def _scatter(pool, idx, rows, mesh):  # idx int32[R, K] (>= NB: not written), rows [L, R * K, BS, C]
    def local(p, i, r):
        return p.at[:, i[0]].set(r.astype(p.dtype), mode="drop")
    if mesh is None:
        return local(pool, idx, rows)
    return jax.shard_map(local, mesh=mesh, in_specs=(POOL, ROWS, POOL), out_specs=POOL,
                         check_vma=False)(pool, idx, rows)


def zeros_on(device, shape, dtype) -> jax.Array:
    """Filler rows for ranks a copy round does not write (kept: they are never donated)."""
    key = (device, shape, jnp.dtype(dtype).name)
    if key not in _ZEROS:
        _ZEROS[key] = jnp.zeros(shape, dtype, device=device)
    return _ZEROS[key]


_ZEROS: dict = {}


def zero_shard(device, shape: tuple, dtype, run: bool = True) -> jax.Array | None:
    """Zeros of `shape` on this device (a resize's new rank's pool shard) by a program compiled once
    per device and kept (jnp.zeros(device=d) compiles per device when first used; through the host
    it would move a pool's bytes). run=False compiles it only, allocating nothing (warm-up)."""
    key = (device, tuple(shape), jnp.dtype(dtype).name)
    if key not in _ZERO_SHARDS:
        zeros = functools.partial(jnp.zeros, tuple(shape), dtype)
        _ZERO_SHARDS[key] = jax.jit(zeros, out_shardings=SingleDeviceSharding(device)).lower().compile()
    return _ZERO_SHARDS[key]() if run else None


_ZERO_SHARDS: dict = {}


def read_rank(pool: jax.Array, mesh, reads: dict[int, list[int]], K: int) -> dict[int, jax.Array]:
    """{rank: local block ids} -> {rank: [L, K, BS, C] on that rank's device}: rows past the ids are
    padding. Every shape is a power-of-two K, so serving compiles nothing new."""
    devices = rank_devices(pool, mesh)
    idx = np.zeros((len(devices), K), np.int32)
    for rank, blocks in reads.items():
        idx[rank, :len(blocks)] = blocks
    shard = {s.device: s.data for s in _gather(pool, idx, mesh).addressable_shards}
    return {rank: shard[devices[rank][0]] for rank in reads if devices[rank][0] in shard}  # this process's


def write_rank(pool: jax.Array, mesh, writes: dict[int, tuple[list[int], Any]], K: int) -> jax.Array:
    """{rank: (local block ids, rows [L, K, BS, C] on any device or host)} -> the pool with them in.
    Every process passes every rank's ids; rows only matter on the process holding the rank."""
    devices = rank_devices(pool, mesh)
    L, _, BS, C = pool.shape
    idx = np.full((len(devices), K), pool.shape[1], np.int32)  # out of range of every rank: dropped
    arrays = []
    for rank, devs in enumerate(devices):
        blocks, rows = writes.get(rank, ([], None))
        idx[rank, :len(blocks)] = blocks
        arrays += [zeros_on(d, (L, K, BS, C), pool.dtype) if rows is None else jax.device_put(rows, d)
                   for d in devs if d.process_index == jax.process_index()]
    if mesh is None:
        return _scatter(pool, idx, arrays[0], mesh)
    rows = jax.make_array_from_single_device_arrays((L, len(devices) * K, BS, C), NamedSharding(mesh, POOL),
                                                    arrays, dtype=pool.dtype)
    return _scatter(pool, idx, rows, mesh)


def copy_blocks(src_pool: jax.Array, src_mesh, dst_pool: jax.Array, dst_mesh,
                moves: list[tuple[int, list[int], int, list[int]]]) -> jax.Array:
    """moves: (source rank, its block ids, destination rank, its block ids) -> the destination pool.
    In rounds that read each source rank and write each destination rank at most once; the rows go
    device to device (jax.device_put), never through the host. The pools may be one (migration)."""
    same = src_pool is dst_pool
    while moves:
        batch, moves = copy_round(moves)
        K = pow2(max(len(m[1]) for m in batch))
        rows = read_rank(src_pool, src_mesh, {m[0]: m[1] for m in batch}, K)
        dst_pool = write_rank(dst_pool, dst_mesh, {m[2]: (m[3], rows[m[0]]) for m in batch}, K)
        src_pool = dst_pool if same else src_pool
    return dst_pool


def copy_round(moves: list) -> tuple[list, list]:
    """The moves of one round (at most one per source rank and per destination rank), and the rest."""
    batch, rest, sources, dests = [], [], set(), set()
    for move in moves:
        if move[0] in sources or move[2] in dests:
            rest.append(move)
            continue
        batch.append(move)
        sources.add(move[0])
        dests.add(move[2])
    return batch, rest
