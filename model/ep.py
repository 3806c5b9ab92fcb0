"""Expert-parallel compute: dispatch tokens to the devices holding their experts, compute, combine.

Axis legend: n tokens on this device, k experts per token, R ranks (devices) in the EP group,
C rows one rank sends another (capacity), El physical experts per rank, Ce rows per local expert
(capacity), D hidden, F expert intermediate. Suffix `_local`: a per-shard value.

Per MoE layer, inside `shard_map` over the EP axes (all devices), as three stages (model/moe.py's
MoE.dispatch / run_experts / combine; separate so two micro-batches can interleave, model/overlap.py):
1. plan: each token goes once to every rank that holds at least one of its experts (deduplicated),
   carrying the ids of its experts there (local numbering) and their gate weights;
2. dispatch: one all-to-all of [R, C, D] rows in the dispatch dtype. "auto" sends what the expert
   GEMMs consume: with FP8 experts the rows quantised 1x128 (e4m3 bytes + float32 scales), which
   the experts use as they arrive (DeepSeek's one quantisation point); otherwise the activations
   as they are. An explicit "fp8" before non-FP8 experts is lossy (the rows are dequantised on
   arrival); "bf16" / "fp32" send floats, quantised at the experts if those are FP8;
3. experts: model.experts.grouped_ffn over the received (row, expert) pairs, weighted and summed
   per row, so one vector per row goes back;
4. combine: the reverse all-to-all of [R, C, D] in the combine dtype ("auto": the activations');
   the sender sums each token's returns.
Capacities are shape buckets (sharding/ep.py: EPConfig, capacities): an overflow is detected (never
silently dropped) and reported, and the host re-runs the step at the next bucket, ending with one
that cannot overflow.
"""

from __future__ import annotations

import dataclasses
import functools

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


# ---- transports: [R, C, ...] rows by destination -> [R, C, ...] rows by source ----------------------

def padded_exchange(rows, counts, axes):
    """Moves every slot, used or not: one dense all_to_all, available on every backend."""
    del counts
    return jax.lax.all_to_all(rows, axes, 0, 0, tiled=True)


def ragged_offsets(counts, my_rank, capacity: int, axes):
    """Arguments of ragged_all_to_all that reproduce padded_exchange's layout: rows for rank j
    start at j * C here, and land at my_rank * C in j's buffer; recv sizes come from the peers."""
    R = counts.shape[0]
    input_offsets = jnp.arange(R, dtype=jnp.int32) * capacity
    output_offsets = jnp.full((R,), my_rank * capacity, jnp.int32)
    recv_sizes = jax.lax.all_to_all(counts, axes, 0, 0, tiled=True)
    return input_offsets, counts, output_offsets, recv_sizes


def ragged_exchange(rows, counts, axes):
    """Moves only the used rows (counts[j] of the C slots for rank j): the GPU transport."""
    R, C = rows.shape[:2]
    flat = rows.reshape(R * C, *rows.shape[2:])
    args = ragged_offsets(counts.astype(jnp.int32), jax.lax.axis_index(axes), C, axes)
    out = jax.lax.ragged_all_to_all(flat, jnp.zeros_like(flat), *args, axis_name=axes)
    return out.reshape(rows.shape)


EXCHANGES = {"padded": padded_exchange, "ragged": ragged_exchange}


# ---- the three stages, each a shard_map over the EP axes --------------------------------------------
# Separate stages let two micro-batches interleave (model/overlap.py): one's attention or
# expert GEMMs run while the other's all-to-all is in flight.

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Dispatched:
    """Rows received by every device, as global arrays whose leading axis is split over the EP
    axes (device r's block is its own [R, C, ...] buffer, flattened)."""
    x: jax.Array  # [R * R*C, D] received rows: activations, or e4m3 for FP8 experts (with x_scale)
    x_scale: jax.Array | None  # float32 [R * R*C, D/128]: the FP8 rows' 1x128 scales (None: float rows)
    ids: jax.Array  # int32[R * R*C, k] local expert ids per row (-1: none)
    weights: jax.Array  # float32[R * R*C, k]
    recv_counts: jax.Array  # int32[R * R] rows from each source
    src_token: jax.Array  # int32[R * R, C] which of the sender's tokens each sent slot holds (n: none)
    send_overflow: jax.Array  # bool[R]
    rows_sent: jax.Array  # int32[R]
    n_dp: int = dataclasses.field(metadata={"static": True})  # tokens per dp group (after padding N)
    n: int = dataclasses.field(metadata={"static": True})  # tokens each device dispatched
    capacity: int = dataclasses.field(metadata={"static": True})  # C
    dtype: object = dataclasses.field(metadata={"static": True})  # of the activations (the experts' GEMM outputs)


def _dispatch_local(x, ids, weights, valid, *, ep: EPConfig, experts_local: int, fp8_experts: bool):
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
        src_token = jnp.full((R, C), n, jnp.int32).at[pair_dest, slots].set(pair_token, mode="drop")
        send_ids = jnp.full((R, C, k), -1, jnp.int32).at[pair_dest, slots].set(pair_ids, mode="drop")
        pair_w = jnp.where(pair_ids >= 0, jnp.repeat(weights, k, axis=0), 0.0)
        send_w = jnp.zeros((R, C, k), jnp.float32).at[pair_dest, slots].set(pair_w, mode="drop")

    exchange = EXCHANGES[ep.transport]
    with jax.named_scope("ep_dispatch"):
        wire = payload(ep, fp8_experts)
        parts = _encode(jnp.concatenate([x, jnp.zeros_like(x[:1])]), wire)
        sent = jnp.minimum(send_counts, C)
        recv = [exchange(p[src_token], sent, axes) for p in parts]  # each [R, C, ...]
        recv_x, recv_scale = (None if a is None else a.reshape(R * C, -1)
                              for a in _decode(recv, wire, x.dtype, fp8_experts))
        recv_counts = jax.lax.all_to_all(sent, axes, 0, 0, tiled=True)  # [R] rows from each source
        # A slot past a source's count holds no row (the ragged transport leaves zeros there).
        used = jnp.arange(C)[None, :] < recv_counts[:, None]  # [R, C]
        recv_ids = jnp.where(used[..., None], exchange(send_ids, sent, axes), -1).reshape(R * C, k)
        recv_w = exchange(send_w, sent, axes).reshape(R * C, k)
    return (recv_x, recv_scale, recv_ids, recv_w, recv_counts, src_token, jnp.any(send_counts > C)[None],
            jnp.sum(send_counts)[None])


def ep_dispatch(x, ids, weights, valid, ep: EPConfig, experts_local: int, fp8_experts: bool = False) -> Dispatched:
    """x [N, D] sharded over the batch axis, ids int32[N, k] physical experts, weights [N, k],
    valid bool[N] -> every device's received rows (fp8_experts: the experts take FP8 input, so
    "auto" dispatches the quantised rows and they stay quantised)."""
    dp = ep.mesh.shape[ep.batch_axis]
    pad = -x.shape[0] % dp
    if pad:  # shard_map needs whole shards; padding tokens are marked invalid and never sent
        x, ids, weights = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, ids, weights))
        valid = jnp.pad(valid, (0, pad))
    batch, per_device = P(ep.batch_axis), P(ep.axes)
    body = jax.shard_map(functools.partial(_dispatch_local, ep=ep, experts_local=experts_local,
                                           fp8_experts=fp8_experts), mesh=ep.mesh,
                         in_specs=(batch,) * 4, out_specs=(per_device,) * 8, check_vma=False)
    n_dp = x.shape[0] // dp
    n = -(-n_dp // ep.split_axes[1])
    C, _ = capacities(n, ids.shape[1], ep.ranks, experts_local, ep.capacity_factor)
    return Dispatched(*body(x, ids, weights, valid), n_dp=n_dp, n=n, capacity=C, dtype=x.dtype)


def ep_experts(d: Dispatched, experts: ExpertWeights, ep: EPConfig, gemm: str = "xla", decode: bool = False):
    """Each device's received rows through its local experts (model.experts.grouped_ffn, in the layout
    of the deployment's GEMMs: expert_layout) -> (rows out [R * R*C, D] float32, tokens per physical
    expert [P], overflow per device [R])."""
    layout = expert_layout(gemm, True, decode)
    El = experts.gate.shape[0] // ep.ranks  # the global [P, F, D]
    _, Ce = capacities(d.n, d.ids.shape[1], ep.ranks, El, ep.capacity_factor)

    def local(x, x_scale, ids, w, experts):
        with jax.named_scope("ep_experts"):
            rows = x if x_scale is None else (x, x_scale)
            out, counts, overflow = grouped_ffn(rows, ids, w, experts, layout, capacity=Ce, dtype=d.dtype, gemm=gemm)
        return out, counts, overflow[None]

    spec = P(ep.axes)
    return jax.shard_map(local, mesh=ep.mesh, in_specs=(spec,) * 5, out_specs=(spec,) * 3,
                         check_vma=False)(d.x, d.x_scale, d.ids, d.weights, experts)


def ep_combine(d: Dispatched, out, ep: EPConfig, dtype):
    """Rows back to their senders in the combine precision; each token's returns summed -> [N_padded, D]."""
    other, split = ep.split_axes
    exchange = EXCHANGES[ep.transport]
    R, C = ep.ranks, d.capacity

    def local(out, recv_counts, src_token):
        with jax.named_scope("ep_combine"):
            wire = dtype if ep.combine_dtype == "auto" else PAYLOAD_DTYPES[ep.combine_dtype]
            back = exchange(out.astype(wire).reshape(R, C, -1), recv_counts, ep.axes)
            y = jnp.zeros((d.n + 1, back.shape[-1]), jnp.float32).at[src_token].add(back.astype(jnp.float32))
            y = y[:d.n].astype(dtype)
            if split > 1:
                y = jax.lax.all_gather(y, other, axis=0, tiled=True)[:d.n_dp]
        return y

    spec = P(ep.axes)
    return jax.shard_map(local, mesh=ep.mesh, in_specs=(spec,) * 3, out_specs=P(ep.batch_axis),
                         check_vma=False)(out, d.recv_counts, d.src_token)


def ep_routed_experts(x, ids, weights, valid, experts: ExpertWeights, ep: EPConfig, gemm: str = "xla",
                      decode: bool = False):
    """x [N, D] (sharded over the batch axis), ids int32[N, k] physical experts, weights [N, k],
    valid bool[N]; expert weights [P, ...] sharded over ep.axes.
    Returns the routed output [N, D] and stats: tokens per physical expert [P], rows each rank
    sent [R], overflow (the step must re-run at the next capacity bucket)."""
    d = ep_dispatch(x, ids, weights, valid, ep, experts.gate.shape[0] // ep.ranks, experts.fp8)
    out, counts, expert_overflow = ep_experts(d, experts, ep, gemm, decode)
    y = ep_combine(d, out, ep, x.dtype)
    return y[:x.shape[0]], ep_stats(d, counts, expert_overflow)


def ep_stats(d: Dispatched, counts, expert_overflow) -> dict:
    return {"expert_load": counts, "rows_sent": d.rows_sent,
            "overflow": jnp.any(d.send_overflow) | jnp.any(expert_overflow)}
