"""Expert-parallel compute: dispatch tokens to the devices holding their experts, compute, combine.

Axis legend: n tokens on this device, k experts per token, R ranks (devices) in the EP group,
C rows one rank sends another (capacity), El physical experts per rank, Ce rows per local expert
(capacity), D hidden, F expert intermediate. Suffix `_local`: a per-shard value.

Per MoE layer, inside `shard_map` over the EP axes (all devices), as stages (model/moe.py's
MoE.plan / dispatch / run_experts / combine / land; separate so two micro-batches can interleave,
model/overlap.py):
1. plan: each token goes once to every rank that holds at least one of its experts (deduplicated),
   carrying the ids of its experts there (local numbering) and their gate weights;
2. dispatch: one all-to-all of one [R, C, W] byte buffer (`pack`): per row slot the row
   in the dispatch dtype, its expert ids and gate weights side by side, as DeepEP moves one
   message per token. "auto" sends what the expert GEMMs consume: with FP8 experts the rows
   quantised 1x128 (e4m3 bytes + float32 scales), which the experts use as they arrive (DeepSeek's
   one quantisation point); otherwise the activations as they are. An explicit "fp8" before
   non-FP8 experts is lossy (the rows are dequantised on arrival); "bf16" / "fp32" send floats,
   quantised at the experts if those are FP8. The ragged (GPU) transport moves only used rows and
   so first learns from each peer how many it sends (R counts); the padded one moves every slot;
3. experts: model.experts.grouped_ffn over the received (row, expert) pairs, weighted and summed
   per row, so one vector per row goes back;
4. combine: the reverse all-to-all of [R, C, D] in the combine dtype ("auto": the activations'),
   its sizes the dispatch's reversed; the sender sums each token's returns.
Capacities are shape buckets (sharding/ep.py: EPConfig, capacities): an overflow is detected (never
silently dropped) and reported, and the host re-runs the step at the next bucket, ending with one
that cannot overflow.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.experts import ExpertWeights, expert_layout, grouped_ffn, slots_by_key
from model.quant import FP8, dequantize_activations, quantize_activations
from sharding.ep import EPConfig, capacities, payload

PAYLOAD_DTYPES = {"auto": None, "fp8": FP8, "bf16": jnp.bfloat16, "fp32": jnp.float32}  # sharding.ep.DISPATCH_DTYPES


# ---- per-shard pieces (pure, testable on their own) -------------------------------------------------

def plan_dispatch(ids, valid, experts_per_rank: int, ranks: int):
    """ids int32[n, k] physical experts, valid bool[n] ->
    pair_dest int32[n*k] (ranks = no row for this pair), pair_ids int32[n*k, k] local expert ids
    the row carries (-1 = not on that rank). Pair (t, j) is a row iff choice j is token t's first
    choice on its rank: one row per (token, destination rank)."""
    n, k = ids.shape
    dest = ids // experts_per_rank  # [n, k]
    same = dest[:, :, None] == dest[:, None, :]  # [n, k, k]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # earlier[j, i]: choice i comes before j
    first = ~jnp.any(same & earlier, axis=-1) & valid[:, None]  # [n, k]
    pair_dest = jnp.where(first, dest, ranks).reshape(-1)
    pair_ids = jnp.where(same, (ids % experts_per_rank)[:, None, :], -1).reshape(n * k, k)
    return pair_dest, pair_ids


def _encode(x, dtype: str):
    """Payload rows for the wire: FP8 rows travel as raw bytes plus one scale per 128 values."""
    if dtype == "auto":
        return (x,)
    if dtype != "fp8":
        return (x.astype(PAYLOAD_DTYPES[dtype]),)
    q, scale = quantize_activations(x)
    return jax.lax.bitcast_convert_type(q, jnp.uint8), scale


def _decode(parts, dtype: str, out_dtype, fp8_experts: bool):
    """Received payload -> the experts' input: rows in out_dtype, or FP8 experts' (e4m3, scale) pair."""
    if dtype != "fp8":
        return parts[0].astype(out_dtype), None
    q = jax.lax.bitcast_convert_type(parts[0], FP8)
    if fp8_experts:  # consumed as it arrives: no dequantise / requantise
        return q, parts[1]
    return dequantize_activations(q, parts[1], out_dtype), None


# ---- one wire buffer: every per-row piece as bytes, side by side --------------------------------------

def pack(parts) -> jax.Array:
    """[R, C, ...] arrays of any dtypes -> uint8 [R, C, W]: each row's pieces as raw bytes, so a
    dispatch moves one buffer (DeepEP's one message per token) rather than one per piece."""
    R, C = parts[0].shape[:2]
    return jnp.concatenate([jax.lax.bitcast_convert_type(p, jnp.uint8).reshape(R, C, -1) for p in parts], axis=-1)


def unpack(buf, like) -> list[jax.Array]:
    """pack's inverse: like is the pieces' (shape [R, C, ...], dtype) as packed."""
    out, at = [], 0
    for shape, dtype in like:
        size, width = jnp.dtype(dtype).itemsize, math.prod(shape[2:])
        raw = buf[..., at:at + width * size]
        at += width * size
        raw = raw.reshape(*buf.shape[:2], *shape[2:], size) if size > 1 else raw.reshape(*buf.shape[:2], *shape[2:])
        out.append(jax.lax.bitcast_convert_type(raw, dtype))
    return out


# ---- transports: [R, C, ...] rows by destination -> [R, C, ...] rows by source ----------------------
# send[j]: rows for rank j (the first send[j] of its C slots); recv[j]: rows rank j sends here.

def padded_exchange(rows, send, recv, axes):
    """Moves every slot, used or not: one dense all_to_all, available on every backend."""
    del send, recv
    return jax.lax.all_to_all(rows, axes, 0, 0, tiled=True)


def ragged_offsets(send, recv, my_rank, capacity: int):
    """Arguments of ragged_all_to_all that reproduce padded_exchange's layout: rows for rank j
    start at j * C here, and land at my_rank * C in j's buffer."""
    R = send.shape[0]
    input_offsets = jnp.arange(R, dtype=jnp.int32) * capacity
    output_offsets = jnp.full((R,), my_rank * capacity, jnp.int32)
    return input_offsets, send, output_offsets, recv


def ragged_exchange(rows, send, recv, axes):
    """Moves only the used rows: the GPU transport. Its receive sizes must be known: a dispatch
    learns them from the peers first (exchange_counts), a combine has them (what it dispatched)."""
    R, C = rows.shape[:2]
    flat = rows.reshape(R * C, *rows.shape[2:])
    args = ragged_offsets(send.astype(jnp.int32), recv.astype(jnp.int32), jax.lax.axis_index(axes), C)
    out = jax.lax.ragged_all_to_all(flat, jnp.zeros_like(flat), *args, axis_name=axes)
    return out.reshape(rows.shape)


def exchange_counts(send, axes):
    """send int32[R] -> the rows each rank sends here [R]."""
    return jax.lax.all_to_all(send, axes, 0, 0, tiled=True)


EXCHANGES = {"padded": padded_exchange, "ragged": ragged_exchange}


# ---- the stages, each a shard_map over the EP axes -----------------------------------------------
# Separate stages let two micro-batches interleave (model/overlap.py): one's attention or expert
# GEMMs run while the other's all-to-all is in flight. Each all-to-all's result leaves its stage
# as it arrived (the dispatch's bytes are unpacked by the experts, the combine's rows summed by
# `ep_land`), so nothing of its own micro-batch waits between its end and the schedule's next step.

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Dispatched:
    """A dispatch in progress, as global arrays whose leading axis is split over the EP axes (device
    r's block is its own, flattened): planned (`ep_plan`: the wire buffer to send, and for the ragged
    transport the counts to receive), then delivered (`ep_dispatch`: the buffer received)."""
    send: jax.Array | None  # uint8 [R * R*C, W] the packed rows for each destination (`pack`), until sent
    buf: jax.Array | None  # uint8 [R * R*C, W] the received buffer: rows, expert ids, gate weights
    recv_counts: jax.Array | None  # int32[R * R] rows from each source
    sent: jax.Array  # int32[R * R] rows sent to each destination (what the combine receives back)
    src_token: jax.Array  # int32[R * R, C] which of the sender's tokens each sent slot holds (n: none)
    send_overflow: jax.Array | None  # bool[R]
    rows_sent: jax.Array | None  # int32[R]
    n_dp: int = dataclasses.field(metadata={"static": True})  # tokens per dp group (after padding N)
    n: int = dataclasses.field(metadata={"static": True})  # tokens each device dispatched
    capacity: int = dataclasses.field(metadata={"static": True})  # C
    dtype: object = dataclasses.field(metadata={"static": True})  # of the activations (the experts' GEMM outputs)
    pieces: tuple = dataclasses.field(default=(), metadata={"static": True})  # ((shape, dtype), ...) as packed
    wire: str = dataclasses.field(default="auto", metadata={"static": True})  # the payload (sharding.ep.payload)
    fp8_experts: bool = dataclasses.field(default=False, metadata={"static": True})

    def for_combine(self) -> "Dispatched":
        """Only what the combine reads (a schedule carries it into the next layer: model/overlap.py)."""
        return dataclasses.replace(self, send=None, buf=None, send_overflow=None, rows_sent=None, pieces=(),
                                   wire="auto", fp8_experts=False)


def _plan_local(x, ids, weights, valid, *, ep: EPConfig, experts_local: int, fp8_experts: bool):
    """One device: x [n_dp, D] (its dp group's tokens, replicated over the other EP axes)."""
    axes = ep.axes
    other, split = ep.split_axes
    # Ranks of one dp group hold the same tokens: each dispatches its own 1/|other| of them.
    n = -(-x.shape[0] // split)
    if split > 1:
        pad = n * split - x.shape[0]
        x, ids, weights = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, ids, weights))
        valid = jnp.pad(valid, (0, pad))
        start = jax.lax.axis_index(other) * n
        x, ids, weights, valid = (jax.lax.dynamic_slice_in_dim(a, start, n) for a in (x, ids, weights, valid))
    R, k = ep.ranks, ids.shape[1]
    C, _ = capacities(n, k, R, experts_local, ep.capacity_factor)

    with jax.named_scope("ep_plan"):
        pair_dest, pair_ids = plan_dispatch(ids, valid, experts_local, R)
        slots, send_counts = slots_by_key(pair_dest, R)
        pair_token = jnp.arange(n * k) // k
        pair_w = jnp.where(pair_ids >= 0, jnp.repeat(weights, k, axis=0), 0.0).astype(jnp.float32)
        # one scatter places each row's token, expert ids and gate weights (as int32 bits) in its slot
        empty = jnp.concatenate([jnp.full((R, C, 1), n, jnp.int32), jnp.full((R, C, k), -1, jnp.int32),
                                 jnp.zeros((R, C, k), jnp.int32)], axis=-1)
        placed = empty.at[pair_dest, slots].set(jnp.concatenate(
            [pair_token[:, None], pair_ids, jax.lax.bitcast_convert_type(pair_w, jnp.int32)], axis=-1), mode="drop")
        src_token, send_ids = placed[..., 0], placed[..., 1:1 + k]  # [R, C], [R, C, k]
        send_w = jax.lax.bitcast_convert_type(placed[..., 1 + k:], jnp.float32)  # [R, C, k]
        wire = payload(ep, fp8_experts)
        rows = [p[src_token] for p in _encode(jnp.concatenate([x, jnp.zeros_like(x[:1])]), wire)]  # each [R, C, ...]
        pieces = [*rows, send_ids, send_w]
        sent = jnp.minimum(send_counts, C)
        # the ragged transport's receive sizes, learnt before the payload goes (the padded one's arrive with it)
        recv_counts = exchange_counts(sent, axes) if ep.transport == "ragged" else jnp.zeros_like(sent)
    return (pack(pieces).reshape(R * C, -1), recv_counts, sent, src_token, jnp.any(send_counts > C)[None],
            jnp.sum(send_counts)[None]), tuple((p.shape, p.dtype) for p in pieces)


def _dispatch_local(send, recv_counts, sent, *, ep: EPConfig, pieces):
    """One device: its packed buffer [R*C, W] to the other ranks -> (received [R*C, W], rows from each source)."""
    R = sent.shape[0]
    with jax.named_scope("ep_dispatch"):
        send = send.reshape(R, -1, send.shape[-1])
        if ep.transport == "ragged":
            return ragged_exchange(send, sent, recv_counts, ep.axes).reshape(-1, send.shape[-1]), recv_counts
        buf = padded_exchange(send, sent, None, ep.axes)
        # every slot travels, an unused one carrying no expert (ids -1, as planned): all C slots of each
        # source are read, and the slots' ids say which hold rows (no count to learn from the buffer)
        return buf.reshape(-1, send.shape[-1]), jnp.full((R,), send.shape[1], jnp.int32)


def _unpack_received(buf, recv_counts, d: "Dispatched"):
    """One device's received buffer [R*C, W] -> the experts' input: rows (float, or FP8 experts'
    (e4m3, scale) pair) [R*C, ...], expert ids int32[R*C, k] (-1: none), gate weights [R*C, k]."""
    R, C = recv_counts.shape[0], d.capacity
    *rows, ids, w = unpack(buf.reshape(R, C, -1), d.pieces)
    # a slot past a source's count holds no row (the ragged transport leaves zeros there)
    ids = jnp.where((jnp.arange(C)[None, :] < recv_counts[:, None])[..., None], ids, -1)
    x, scale = (None if a is None else a.reshape(R * C, -1) for a in _decode(rows, d.wire, d.dtype, d.fp8_experts))
    return (x if scale is None else (x, scale)), ids.reshape(R * C, -1), w.reshape(R * C, -1)


def dispatch_sizes(N: int, k: int, ep: EPConfig, experts_local: int) -> tuple[int, int, int]:
    """(n_dp tokens per dp group, n tokens each device dispatches, C) for N tokens."""
    n_dp = -(-N // ep.mesh.shape[ep.batch_axis])
    n = -(-n_dp // ep.split_axes[1])
    return n_dp, n, capacities(n, k, ep.ranks, experts_local, ep.capacity_factor)[0]


def idle_dispatched(N: int, D: int, k: int, ep: EPConfig, experts_local: int, dtype) -> tuple[Dispatched, jax.Array]:
    """What a dispatch of nothing leaves for the combine (`Dispatched.for_combine`), and the rows out
    [R * R*C, D]: combining them moves no row (the ragged transport) and returns zeros."""
    n_dp, n, C = dispatch_sizes(N, k, ep, experts_local)
    R = ep.ranks
    none = jnp.zeros((R * R,), jnp.int32)
    sent = Dispatched(None, None, none, none, jnp.full((R * R, C), n, jnp.int32), None, None, n_dp=n_dp, n=n,
                      capacity=C, dtype=dtype)
    return sent, jnp.zeros((R * R * C, D), jnp.float32)


def ep_plan(x, ids, weights, valid, ep: EPConfig, experts_local: int, fp8_experts: bool = False) -> Dispatched:
    """x [N, D] sharded over the batch axis, ids int32[N, k] physical experts, weights [N, k],
    valid bool[N] -> the dispatch planned: each device's packed buffer, and (ragged transport) the
    counts it will receive (fp8_experts: the experts take FP8 input, so "auto" dispatches the
    quantised rows and they stay quantised)."""
    dp = ep.mesh.shape[ep.batch_axis]
    pad = -x.shape[0] % dp
    if pad:  # shard_map needs whole shards; padding tokens are marked invalid and never sent
        x, ids, weights = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, ids, weights))
        valid = jnp.pad(valid, (0, pad))
    batch, per_device = P(ep.batch_axis), P(ep.axes)
    layout = []

    def local(*args):
        out, pieces = _plan_local(*args, ep=ep, experts_local=experts_local, fp8_experts=fp8_experts)
        layout.append(pieces)
        return out

    send, recv_counts, sent, src_token, overflow, rows_sent = jax.shard_map(
        local, mesh=ep.mesh, in_specs=(batch,) * 4, out_specs=(per_device,) * 6,
        check_vma=False)(x, ids, weights, valid)
    n_dp, n, C = dispatch_sizes(x.shape[0], ids.shape[1], ep, experts_local)
    return Dispatched(send, None, recv_counts, sent, src_token, overflow, rows_sent, n_dp=n_dp, n=n, capacity=C,
                      dtype=x.dtype, pieces=layout[0], wire=payload(ep, fp8_experts), fp8_experts=fp8_experts)


def ep_dispatch(d: Dispatched, ep: EPConfig) -> Dispatched:
    """The planned buffers sent: one all-to-all -> every device's received buffer."""
    spec = P(ep.axes)
    buf, recv_counts = jax.shard_map(functools.partial(_dispatch_local, ep=ep, pieces=d.pieces), mesh=ep.mesh,
                                     in_specs=(spec,) * 3, out_specs=(spec,) * 2,
                                     check_vma=False)(d.send, d.recv_counts, d.sent)
    return dataclasses.replace(d, send=None, buf=buf, recv_counts=recv_counts)


def ep_experts(d: Dispatched, experts: ExpertWeights, ep: EPConfig, gemm: str = "xla", decode: bool = False):
    """Each device's received rows through its local experts (model.experts.grouped_ffn, in the layout
    of the deployment's GEMMs: expert_layout) -> (rows out [R * R*C, D] float32, tokens per physical
    expert [P], overflow per device [R])."""
    layout = expert_layout(gemm, True, decode)
    El = experts.gate.shape[0] // ep.ranks  # the global [P, F, D]
    k = d.pieces[-1][0][-1]
    _, Ce = capacities(d.n, k, ep.ranks, El, ep.capacity_factor)

    def local(buf, recv_counts, experts):
        with jax.named_scope("ep_experts"):
            rows, ids, w = _unpack_received(buf, recv_counts, d)
            out, counts, overflow = grouped_ffn(rows, ids, w, experts, layout, capacity=Ce, dtype=d.dtype, gemm=gemm)
        return out, counts, overflow[None]

    spec = P(ep.axes)
    return jax.shard_map(local, mesh=ep.mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3,
                         check_vma=False)(d.buf, d.recv_counts, experts)


def ep_combine(d: Dispatched, out, ep: EPConfig, dtype):
    """The experts' rows out [R * R*C, D] back to their senders in the combine precision (one
    all-to-all: its sizes are the dispatch's, reversed) -> the rows as received [R * R*C, D]."""
    R, C = ep.ranks, d.capacity

    def local(out, recv_counts, sent):
        with jax.named_scope("ep_combine"):
            wire = dtype if ep.combine_dtype == "auto" else PAYLOAD_DTYPES[ep.combine_dtype]
            back = EXCHANGES[ep.transport](out.astype(wire).reshape(R, C, -1), recv_counts, sent, ep.axes)
        return back.reshape(R * C, -1)

    spec = P(ep.axes)
    return jax.shard_map(local, mesh=ep.mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)(out, d.recv_counts, d.sent)


def ep_land(d: Dispatched, back, ep: EPConfig, dtype):
    """The combined rows [R * R*C, D] summed per token -> [N_padded, D] (sharded over the batch axis)."""
    other, split = ep.split_axes

    def local(back, src_token):
        with jax.named_scope("ep_land"):
            y = jnp.zeros((d.n + 1, back.shape[-1]), jnp.float32).at[src_token].add(
                back.reshape(*src_token.shape, -1).astype(jnp.float32))
            y = y[:d.n].astype(dtype)
            if split > 1:
                y = jax.lax.all_gather(y, other, axis=0, tiled=True)[:d.n_dp]
        return y

    spec = P(ep.axes)
    return jax.shard_map(local, mesh=ep.mesh, in_specs=(spec,) * 2, out_specs=P(ep.batch_axis),
                         check_vma=False)(back, d.src_token)


def ep_routed_experts(x, ids, weights, valid, experts: ExpertWeights, ep: EPConfig, gemm: str = "xla",
                      decode: bool = False):
    """x [N, D] (sharded over the batch axis), ids int32[N, k] physical experts, weights [N, k],
    valid bool[N]; expert weights [P, ...] sharded over ep.axes.
    Returns the routed output [N, D] and stats: tokens per physical expert [P], rows each rank
    sent [R], overflow (the step must re-run at the next capacity bucket)."""
    d = ep_dispatch(ep_plan(x, ids, weights, valid, ep, experts.gate.shape[0] // ep.ranks, experts.fp8), ep)
    out, counts, expert_overflow = ep_experts(d, experts, ep, gemm, decode)
    y = ep_land(d, ep_combine(d, out, ep, x.dtype), ep, x.dtype)
    stats = ep_stats(d, counts, expert_overflow)
    return y[:x.shape[0]], {**stats, "overflow": jnp.any(stats["overflow"])}


def ep_stats(d: Dispatched, counts, expert_overflow) -> dict:
    """overflow stays per device (bool[R]): reduced once, at the end of the step, not per layer."""
    return {"expert_load": counts, "rows_sent": d.rows_sent, "overflow": d.send_overflow | expert_overflow}
