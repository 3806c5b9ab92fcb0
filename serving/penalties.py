"""The penalty table: per-request state over the vocabulary that presence / frequency / repetition
penalties and logit_bias need (serving/sampling.py applies them).

It lives on the device: each dp rank holds SLOTS rows of [V] token counts (prompt presence in bit
24, output counts below) and [V] biases. A request that uses either takes a row on its rank when it
first samples there; the row is written once from the host's prompt and output, and every step adds
the token it sampled, inside the step. Rows never move: a request that changes rank or engine
(resize, prefill -> decode hand-over) is given a fresh row built the same way. Shapes are fixed, so
the step compiles once per bucket.

Axis legend: B batch rows, V vocabulary, S slots per rank, R dp ranks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.mesh import LOGICAL_RULES, logical_to_spec

BY_RANK = logical_to_spec(("batch",))  # each dp rank holds its own requests' rows
RANK_AXIS = LOGICAL_RULES["batch"]
PROMPT_BIT = 1 << 24  # counts below it: output tokens of a request can never reach 2^24


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _TableArrays:
    counts: jax.Array  # i32[R * S, V], sharded over dp
    bias: jax.Array  # f32[R * S, V], sharded over dp
    slots: int = dataclasses.field(metadata={"static": True})  # S: rows per rank (a row's slot S: none)
    mesh: object = dataclasses.field(default=None, metadata={"static": True})

    def per_rank(self, fn, out_specs, *args, replicated: int = 0):
        """fn over each dp rank's rows; the last `replicated` args are the same on every rank."""
        if self.mesh is None:
            return fn(*args)
        specs = tuple(BY_RANK for _ in args[:len(args) - replicated]) + (P(),) * replicated
        return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)

    def rows(self, slot):
        """slot i32[B] (rank-local; out of range: none) -> counts i32[B, V], bias f32[B, V] (zeros: none)."""
        def local(counts, bias, slot):
            return (jnp.take(counts, slot, axis=0, mode="fill", fill_value=0),
                    jnp.take(bias, slot, axis=0, mode="fill", fill_value=0))
        return self.per_rank(local, (BY_RANK, BY_RANK), self.counts, self.bias, slot)

    def count(self, slot, tokens, keep):
        """Adds each row's new tokens (tokens [B, S]) to its slot's counts where keep bool[B, S]: False
        for tokens not emitted (rejected drafts' junk) and on an EP overflow (the step re-runs), so a
        re-run does not count twice."""
        def local(counts, slot, tokens, keep):
            return counts.at[slot[:, None], tokens].add(keep.astype(jnp.int32), mode="drop")
        counts = self.per_rank(local, BY_RANK, self.counts, slot, tokens, keep)
        return dataclasses.replace(self, counts=counts)


class PenaltyTable:
    """Host bookkeeping of the device rows (which request holds which slot on which rank)."""
    Device = _TableArrays

    def __init__(self, ranks: int, slots: int, vocab: int, mesh):
        self.slots, self.vocab = slots, vocab
        self.resize(ranks, mesh)

    def resize(self, ranks: int, mesh) -> None:
        """A new (empty) table for `ranks` dp ranks on `mesh`; every request re-takes a row."""
        self.ranks, self.mesh = ranks, (mesh if mesh is not None and mesh.size > 1 else None)
        shape = (ranks * self.slots, self.vocab)
        sharding = NamedSharding(mesh, BY_RANK) if mesh is not None else None
        self.device = _TableArrays(jax.device_put(np.zeros(shape, np.int32), sharding),
                                   jax.device_put(np.zeros(shape, np.float32), sharding), self.slots, self.mesh)
        self.free = [list(range(self.slots)) for _ in range(ranks)]
        self.held: dict[str, tuple[int, int]] = {}  # request id -> (rank, slot)

    def slot(self, req, rank: int, live) -> int | None:
        """The request's slot on `rank` (written now if new); None if it needs none. live(id): still
        running on this engine (slots of requests that left without release are reclaimed)."""
        if not req.params.needs_table:
            return None
        held = self.held.get(req.id)
        if held is not None and held[0] == rank:
            return held[1]
        self.release(req.id)
        if not self.free[rank]:
            for rid in [r for r, (k, _) in self.held.items() if k == rank and not live(r)]:
                self.release(rid)
        slot = self.free[rank].pop()  # a rank runs at most SLOTS requests (serving/engine.py sizes it)
        self.held[req.id] = (rank, slot)
        counts = np.bincount(np.asarray(req.output, np.int64), minlength=self.vocab).astype(np.int32)
        counts[np.asarray(req.prompt, np.int64)] |= PROMPT_BIT
        bias = np.zeros(self.vocab, np.float32)
        for t, b in req.params.logit_bias:
            bias[t] = b
        self.device = _write_row(self.device, np.int32(rank * self.slots + slot), counts, bias)
        return slot

    def warm_up(self) -> None:
        """Compiles the row write (on a row no rank holds: nothing changes), so the first request
        with penalties does not wait for a compilation."""
        zeros = np.zeros(self.vocab, np.int32)
        self.device = _write_row(self.device, np.int32(self.ranks * self.slots), zeros, zeros.astype(np.float32))

    def release(self, request_id: str) -> None:
        held = self.held.pop(request_id, None)
        if held is not None and held[0] < self.ranks:
            self.free[held[0]].append(held[1])


@functools.partial(jax.jit, donate_argnums=0)
def _write_row(table: _TableArrays, index, counts, bias) -> _TableArrays:
    """Writes one slot's row (index = rank * S + slot) on the rank that holds it."""
    def local(c, b, index, counts, bias):
        S = c.shape[0]
        mine = (index // S) == (jax.lax.axis_index(RANK_AXIS) if table.mesh is not None else 0)
        row = jnp.where(mine, index % S, S)  # out of range: dropped on the other ranks
        return c.at[row].set(counts, mode="drop"), b.at[row].set(bias, mode="drop")
    if table.mesh is None:
        c, b = local(table.counts, table.bias, index, counts, bias)
    else:
        c, b = jax.shard_map(local, mesh=table.mesh, in_specs=(BY_RANK, BY_RANK, P(), P(), P()),
                             out_specs=(BY_RANK, BY_RANK), check_vma=False)(table.counts, table.bias, index,
                                                                             counts, bias)
    return dataclasses.replace(table, counts=c, bias=b)
