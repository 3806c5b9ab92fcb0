"""Two-batch overlap (prefill) and the 5-stage decode pipeline for an expert-parallel MoE layer.

Each dp rank's rows are split into two micro-batches (the first and second half of its rows; the
engine orders rows with `balanced_slots` so the halves carry equal work). A layer then runs the
decoder layer's stages (model/decoder.py: attention, gate, dispatch, experts, combine) for both
micro-batches, interleaved. A schedule is a list of steps; between steps an optimization_barrier
joins both micro-batches' latest products (PRODUCTS), so what one step holds runs together: one
micro-batch's all-to-all in flight while the other computes. Written as SGLang writes its operation lists:

    two_batch:  0.attention 0.gate 0.dispatch 1.attention | 1.gate 1.dispatch 0.experts
                | 0.combine 1.experts | 1.combine
    five_stage: 0.attention 0.gate 0.dispatch 1.attention | 0.experts | 1.gate 1.dispatch
                0.combine | 1.experts 1.combine

(five_stage: decode's attention is short, so its core and its output + gate are stages of their
own and the steps are of similar length.) No stage of micro-batch 1 reads anything micro-batch 0's
dispatch or combine produces before it needs it, so XLA's latency-hiding scheduler can run one's
all-to-all while the other computes.

Axis legend: B rows (dp ranks x rows per rank), S positions, D hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.attention import InCache

Step = list[tuple[int, str]]  # (micro-batch, stage name) in program order
SCHEDULES: dict[str, list[Step]] = {
    "two_batch": [
        [(0, "attention"), (0, "gate"), (0, "dispatch"), (1, "attention")],  # attention(1) under dispatch(0)
        [(1, "gate"), (1, "dispatch"), (0, "experts")],  # experts(0) under dispatch(1)
        [(0, "combine"), (1, "experts")],  # experts(1) under combine(0)
        [(1, "combine")],
    ],
    "five_stage": [
        [(0, "attention"), (0, "gate"), (0, "dispatch"), (1, "attention")],  # attention(1) under dispatch(0)
        [(0, "experts")],
        [(1, "gate"), (1, "dispatch"), (0, "combine")],  # combine(0) beside dispatch(1)
        [(1, "experts"), (1, "combine")],
    ],
}


def halves(a, dp: int):
    """[B, ...] with B = dp x b rows -> ([dp*b0, ...], [dp*b1, ...]): each rank's first and second half."""
    b = a.shape[0] // dp
    grouped = a.reshape(dp, b, *a.shape[1:])
    first = (b + 1) // 2
    return (grouped[:, :first].reshape(-1, *a.shape[1:]), grouped[:, first:].reshape(-1, *a.shape[1:]))


def join(a0, a1, dp: int):
    g0, g1 = a0.reshape(dp, -1, *a0.shape[1:]), a1.reshape(dp, -1, *a1.shape[1:])
    return jnp.concatenate([g0, g1], axis=1).reshape(-1, *a0.shape[1:])


def split_state(s, dp: int):
    """A prepared LayerState -> the two micro-batches' (rows split by `halves`; keys read in place
    become a view of each half's page-table rows)."""
    parts = []
    for i in (0, 1):
        if isinstance(s.keys, InCache):
            keys = s.keys.select_rows(lambda table: halves(table, dp)[i])
        else:
            keys = halves(s.keys, dp)[i]
        half = {f: halves(getattr(s, f), dp)[i] for f in ("x", "valid", "slots", "q_nope", "q_pe", "mask")}
        parts.append(type(s)(**half, keys=keys, absorbed=s.absorbed))
    return parts


# What each stage hands on: the values a barrier joins (a micro-batch's latest product), so that
# both are computed before either is used while the rest stays free for XLA to schedule.
PRODUCTS = {"attention": ("core",), "gate": ("routed",), "dispatch": ("sent",), "experts": ("experts_out",),
            "combine": ("x",), "mlp": ("x",)}


def run_schedule(layer, states: list, schedule: list[Step]) -> list:
    """The layer's stages over the micro-batches' states, step by step; between steps an
    optimization_barrier joins each micro-batch's latest product."""
    stages, latest = layer.stages(), [None] * len(states)
    for i, step in enumerate(schedule):
        if i:
            _barrier(states, latest)
        for mb, name in step:
            with jax.named_scope(f"mb{mb}/{name}"):
                stages[name](states[mb])
            latest[mb] = name
    return states


def _barrier(states: list, latest: list) -> None:
    fields = [PRODUCTS[name] if name else () for name in latest]
    joined = jax.lax.optimization_barrier(tuple(tuple(getattr(s, f) for f in fs) for s, fs in zip(states, fields)))
    for s, fs, values in zip(states, fields, joined):
        for f, v in zip(fs, values):
            setattr(s, f, v)


def overlapped_layer(layer, x, cos, sin, cache, index, slots, mask, absorbed: bool, schedule: str):
    """DecoderLayer.__call__ for a MoE layer under EP, with two interleaved micro-batches; None when
    the batch has fewer than two rows per rank. schedule "auto": five_stage for decode (absorbed),
    two_batch for prefill."""
    if schedule == "auto":
        schedule = "five_stage" if absorbed else "two_batch"
    ep = layer.mlp.ep
    dp = ep.mesh.shape[ep.batch_axis]
    if x.shape[0] % dp or x.shape[0] // dp < 2:  # fewer than two rows per rank: nothing to split
        return None
    # Projections and the cache write for both micro-batches at once: cheap, and it keeps one
    # cache update per layer.
    s, cache = layer.prepare(x, cos, sin, cache, index, slots, mask, absorbed)
    s0, s1 = run_schedule(layer, split_state(s, dp), SCHEDULES[schedule])
    stats = {"expert_load": s0.stats["expert_load"] + s1.stats["expert_load"],
             "rows_sent": s0.stats["rows_sent"] + s1.stats["rows_sent"],
             "overflow": s0.stats["overflow"] | s1.stats["overflow"]}
    return join(s0.x, s1.x, dp), cache, stats


def balanced_slots(costs: list[float], rows: int) -> list[int]:
    """Slots (0..rows-1) for one rank's requests so the halves split by `halves` carry equal work:
    heaviest first, each into the lighter half that still has room."""
    first = (rows + 1) // 2
    room, load, nxt = [first, rows - first], [0.0, 0.0], [0, first]
    slots = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        half = min((h for h in (0, 1) if room[h]), key=lambda h: load[h])
        slots[i], load[half], room[half], nxt[half] = nxt[half], load[half] + costs[i], room[half] - 1, nxt[half] + 1
    return slots
