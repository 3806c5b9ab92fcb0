"""Two-batch overlap (prefill) and the five-stage decode pipeline, skewed across layers as DeepSeek
runs them (deepseek-ai/profile-data; docs/ARCHITECTURE.md draws the compiled schedule).

Each dp rank's rows are split into two micro-batches (the first and second half of its rows; the
engine orders rows with `balanced_slots` so the halves carry equal work). The MoE layers then run
the decoder layer's stages (model/decoder.py) for both micro-batches, interleaved: a schedule is a
list of steps, and between steps an optimization_barrier joins all that both micro-batches hold
(HELD), so what one step holds runs together: one micro-batch's all-to-all in flight while the
other computes. One micro-batch (`lag`) runs a stage behind: its combine, which reads no weight,
runs at the start of the next layer's body, under the other's attention, so no all-to-all is left
at the end of a layer with nothing of the other micro-batch to hide it:

    two_batch  (prefill, lag 0): [0.combine(l-1)] 1.prepare 1.attention 1.gate | 0.land 1.route 1.plan
               | [1.dispatch] 0.prepare 0.attention 0.gate | 0.route 0.plan | [0.dispatch] 1.experts
               1.shared | [1.combine] 0.experts 0.shared | 1.land
    five_stage (decode, lag 1):  [1.combine(l-1)] 0.prepare 0.attention 0.gate | 1.land 0.route 0.plan
               | [0.dispatch] 1.prepare | 0.experts | [0.combine] 1.attention 1.gate | 0.land 1.route
               1.plan | [1.dispatch] 0.shared 1.shared | 1.experts

([...]: the step's all-to-all. two_batch is DeepSeek's prefill: each all-to-all under the other
micro-batch's attention or MoE. five_stage: decode's attention is long and its MoE short, so
attention is split, DeepSeek's ATTN-0 (prepare) under the other's dispatch and ATTN-1 (attention +
gate) under its combine, and the routed experts run with nothing in flight.) One all-to-all per step
(XLA keeps one in flight; the plan steps carry the ragged transport's small counts exchange), and no
routing at the end of an all-to-all step: XLA's scheduler puts under a collective the last ~5
non-GEMM kernels before the step's end (docs/ARCHITECTURE.md, "The schedule as compiled"). After the
last layer the lagging micro-batch's combine runs under the other's head (DeepseekV3.forward_step:
final norm and logits per micro-batch).

Axis legend: B rows (dp ranks x rows per rank), S positions, D hidden.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model.ep import idle_dispatched

Step = list[tuple[int, str]]  # (micro-batch, stage name) in program order


@dataclasses.dataclass(frozen=True)
class Schedule:
    lag: int  # the micro-batch whose combine runs in the next layer's first step
    steps: list[Step]


SCHEDULES: dict[str, Schedule] = {
    "two_batch": Schedule(lag=0, steps=[
        [(0, "combine"), (1, "prepare"), (1, "attention"), (1, "gate")],  # combine(0) of layer l-1 under attention(1)
        [(0, "land"), (1, "route"), (1, "plan")],
        [(1, "dispatch"), (0, "prepare"), (0, "attention"), (0, "gate")],  # dispatch(1) under attention(0)
        [(0, "route"), (0, "plan")],
        [(0, "dispatch"), (1, "experts"), (1, "shared")],  # dispatch(0) under MoE(1)
        [(1, "combine"), (0, "experts"), (0, "shared")],  # combine(1) under MoE(0)
        [(1, "land")],
    ]),
    "five_stage": Schedule(lag=1, steps=[
        [(1, "combine"), (0, "prepare"), (0, "attention"), (0, "gate")],  # combine(1) of layer l-1 under attention(0)
        [(1, "land"), (0, "route"), (0, "plan")],
        [(0, "dispatch"), (1, "prepare")],  # dispatch(0) under ATTN-0(1)
        [(0, "experts")],
        [(0, "combine"), (1, "attention"), (1, "gate")],  # combine(0) under ATTN-1(1)
        [(0, "land"), (1, "route"), (1, "plan")],
        [(1, "dispatch"), (0, "shared"), (1, "shared")],  # dispatch(1) under the shared experts
        [(1, "experts")],
    ]),
}

# What a barrier joins: every value a (micro-)batch holds between stages (LayerState's, but the cache
# views), so that nothing of a later step starts before the step before it ends, while inside a step
# XLA is free to run one micro-batch's all-to-all under the other's compute. An all-to-all's result goes
# to the barrier as it arrived, so the step's end waits on it directly.
HELD = ("x", "h", "q_nope", "q_pe", "core", "routed", "sent", "experts_out", "stats", "shared", "back", "y")


def resolve(schedule: str, absorbed: bool) -> Schedule:
    """schedule "auto": five_stage for decode (absorbed), two_batch for prefill."""
    if schedule == "auto":
        schedule = "five_stage" if absorbed else "two_batch"
    return SCHEDULES[schedule]


def halves(a, dp: int):
    """[B, ...] with B = dp x b rows -> ([dp*b0, ...], [dp*b1, ...]): each rank's first and second half."""
    b = a.shape[0] // dp
    grouped = a.reshape(dp, b, *a.shape[1:])
    first = (b + 1) // 2
    return (grouped[:, :first].reshape(-1, *a.shape[1:]), grouped[:, first:].reshape(-1, *a.shape[1:]))


def join(a0, a1, dp: int):
    g0, g1 = a0.reshape(dp, -1, *a0.shape[1:]), a1.reshape(dp, -1, *a1.shape[1:])
    return jnp.concatenate([g0, g1], axis=1).reshape(-1, *a0.shape[1:])


def join_trees(t0, t1, dp: int):
    return jax.tree.map(lambda a0, a1: join(a0, a1, dp), t0, t1)


@dataclasses.dataclass
class CacheRef:
    """The step's cache and the layer's index, shared by the (micro-)batches' prepare stages."""
    cache: object
    layer: jax.Array


@dataclasses.dataclass(frozen=True)
class Part:
    """Micro-batch i of the step's rows (per rank: rows[0] in the first, rows[1] in the second):
    its view of the cache, and its writes into the whole batch's."""
    i: int
    dp: int
    rows: tuple[int, int]

    def view(self, cache):
        """Reads only: the cache as this micro-batch's rows see it (with its decode plan, made once a step
        where the cache holds one: serving/kv_cache.py PagedCache.with_plan)."""
        plans = getattr(cache, "part_plans", None)
        pick = lambda a: halves(a, self.dp)[self.i]  # noqa: E731
        return cache.select_rows(pick) if plans is None else cache.select_rows(pick, plan=plans[self.i])

    def write(self, cache, layer, slots, rows):
        """This micro-batch's rows [b, S, C] at slots int32[b, S] into the cache (the other micro-batch's
        rows there as padding: slot -1, not written)."""
        n = self.dp * self.rows[1 - self.i]
        other = (jnp.full((n, *slots.shape[1:]), -1, slots.dtype), jnp.zeros((n, *rows.shape[1:]), rows.dtype))
        mine = (slots, rows)
        first, second = (mine, other) if self.i == 0 else (other, mine)
        return cache.write(layer, join(first[0], second[0], self.dp), join(first[1], second[1], self.dp))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Lagging:
    """The lagging micro-batch between layers: all of its layer but the combine (which reads no weight)."""
    x: jax.Array  # [b, S, D] the residual stream after attention
    shared: jax.Array  # [b, S, D] the shared expert's output
    sent: object  # model.ep.Dispatched, what its combine reads (the received rows dropped)
    experts_out: jax.Array  # the routed experts' rows out


def _micro_batches(x, cos, sin, slots, mask, dp: int) -> list[dict]:
    """Each micro-batch's part of the step's per-row inputs (its LayerState fields)."""
    B = x.shape[0]
    rows = ((B // dp + 1) // 2, B // dp // 2)
    pieces = {"cos": cos, "sin": sin, "slots": slots, "mask": mask, "x": x}
    return [{**{k: halves(v, dp)[i] for k, v in pieces.items()}, "part": Part(i, dp, rows)} for i in (0, 1)]


def _run_body(layer, lead_x, lag: Lagging, ref: CacheRef, parts: list[dict], sched: Schedule, absorbed: bool):
    """One layer for both micro-batches: the lagging one's combine of the layer before first."""
    L, F = sched.lag, 1 - sched.lag
    states = [None, None]
    states[F] = layer.state(**{**parts[F], "x": lead_x}, absorbed=absorbed)
    states[L] = layer.state(**{**parts[L], "x": lag.x}, absorbed=absorbed, shared=lag.shared, sent=lag.sent,
                            experts_out=lag.experts_out)
    stages = layer.stages(ref)
    for i, step in enumerate(sched.steps):
        if i:
            _barrier(states)
        for mb, name in step:
            with jax.named_scope(f"mb{mb}/{name}"):
                stages[name](states[mb])
    s0, s1 = states
    stats = {"expert_load": s0.stats["expert_load"] + s1.stats["expert_load"],
             "rows_sent": s0.stats["rows_sent"] + s1.stats["rows_sent"],
             "overflow": s0.stats["overflow"] | s1.stats["overflow"]}
    late = states[L]
    return states[F].x, Lagging(late.x, late.shared, late.sent.for_combine(), late.experts_out), stats


def _barrier(states: list) -> None:
    fields = [[f for f in HELD if getattr(s, f) is not None] for s in states]
    joined = jax.lax.optimization_barrier(tuple(tuple(getattr(s, f) for f in fs) for s, fs in zip(states, fields)))
    for s, fs, values in zip(states, fields, joined):
        for f, v in zip(fs, values):
            setattr(s, f, v)


def _finish(layer, lead_x, lag: Lagging, parts: list[dict], sched: Schedule, absorbed: bool, head) -> list:
    """After the last layer: the lagging micro-batch's combine under the other's head, then its own
    land and head -> [head's output for micro-batch 0, for micro-batch 1]."""
    L, F = sched.lag, 1 - sched.lag
    dp = parts[0]["part"].dp
    rows = halves(jnp.arange(sum(p["x"].shape[0] for p in parts), dtype=jnp.int32), dp)
    s = layer.state(**{**parts[L], "x": lag.x}, absorbed=absorbed, shared=lag.shared, sent=lag.sent,
                    experts_out=lag.experts_out)
    outs = [None, None]
    with jax.named_scope(f"mb{L}/combine"):
        layer.combine(s)
    with jax.named_scope(f"mb{F}/head"):
        outs[F] = head(lead_x, rows[F])
    s.back, outs[F] = jax.lax.optimization_barrier((s.back, outs[F]))
    with jax.named_scope(f"mb{L}/land"):
        layer.land(s)
    with jax.named_scope(f"mb{L}/head"):
        outs[L] = head(s.x, rows[L])
    return outs


def _start(moe, x_lag) -> Lagging:
    """The lagging micro-batch before the first layer: a combine of nothing to run."""
    N, D = x_lag.shape[0] * x_lag.shape[1], x_lag.shape[-1]
    sent, out = idle_dispatched(N, D, moe.gate.cfg.num_experts_per_tok, moe.ep,
                                moe.phy2log.shape[-1] // moe.ep.ranks, x_lag.dtype)
    return Lagging(x_lag, jnp.zeros_like(x_lag), sent, out)


def splits(x, ep) -> bool:
    """Whether the batch has two micro-batches: at least two rows on every dp rank."""
    dp = ep.mesh.shape[ep.batch_axis]
    return x.shape[0] % dp == 0 and x.shape[0] // dp >= 2


def overlapped_stack(stack, x, cos, sin, cache, layer0, slots, mask, absorbed: bool, schedule: str, head):
    """A stack of MoE layers (stacked weights, lax.scan) under EP with two skewed micro-batches, then
    head(x [b, S, D], rows int32[b]) of each -> ([head's output for micro-batch 0, for 1], cache,
    per-layer stats); the lagging micro-batch's last combine runs under the other's head."""
    sched, dp = resolve(schedule, absorbed), stack.mlp.ep.mesh.shape[stack.mlp.ep.batch_axis]
    parts = _micro_batches(x, cos, sin, slots, mask, dp)
    L, F = sched.lag, 1 - sched.lag
    graphdef, params = nnx.split(stack)

    def body(carry, layer_params):
        lead_x, lag, cache, index = carry
        ref = CacheRef(cache, index)
        lead_x, lag, stats = _run_body(nnx.merge(graphdef, layer_params), lead_x, lag, ref, parts, sched, absorbed)
        return (lead_x, lag, ref.cache, index + 1), stats

    start = (parts[F]["x"], _start(stack.mlp, parts[L]["x"]), cache, jnp.int32(layer0))
    (lead_x, lag, cache, _), stats = jax.lax.scan(body, start, params)
    return _finish(stack, lead_x, lag, parts, sched, absorbed, head), cache, stats


def overlapped_layer(layer, x, cos, sin, cache, index, slots, mask, absorbed: bool, schedule: str):
    """DecoderLayer.__call__ for one MoE layer under EP (the MTP module) with two skewed
    micro-batches; None when the batch has fewer than two rows per rank."""
    if not splits(x, layer.mlp.ep):
        return None
    sched, dp = resolve(schedule, absorbed), layer.mlp.ep.mesh.shape[layer.mlp.ep.batch_axis]
    parts = _micro_batches(x, cos, sin, slots, mask, dp)
    L, F = sched.lag, 1 - sched.lag
    ref = CacheRef(cache, index)
    lead_x, lag, stats = _run_body(layer, parts[F]["x"], _start(layer.mlp, parts[L]["x"]), ref, parts, sched,
                                   absorbed)
    xs = _finish(layer, lead_x, lag, parts, sched, absorbed, lambda x, rows: x)
    return join(xs[0], xs[1], dp), ref.cache, stats


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
