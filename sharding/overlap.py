"""Two-batch overlap (prefill) and the 5-stage decode pipeline for an expert-parallel MoE layer.

Each dp rank's rows are split into two micro-batches (the first and second half of its rows; the
engine orders rows so the halves carry equal work). A layer then runs as interleaved stages,
in program order:

    two_batch:  attn(0) disp(0) | attn(1) disp(1) | experts(0) comb(0) | experts(1) comb(1)
    five_stage: attn_a(0) attn_b(0) disp(0) | attn_a(1) experts(0) | attn_b(1) disp(1) comb(0) | experts(1) comb(1)

(attn_a: core attention; attn_b: output projection, residual, norm and gate — decode's short
attention split so stages are of similar length.) No stage of micro-batch 1 reads anything that
micro-batch 0's dispatch or combine produces, so XLA's latency-hiding scheduler can run one's
all-to-all while the other computes; an optimization_barrier joins each pair that should overlap
so neither is deferred past the other's consumer.

Axis legend: B rows (dp ranks x rows per rank), S positions, D hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sharding.ep import ep_combine, ep_dispatch, ep_experts, ep_stats

SCHEDULES = ("none", "auto", "two_batch", "five_stage")


def halves(a, dp: int):
    """[B, ...] with B = dp x b rows -> ([dp*b0, ...], [dp*b1, ...]): each rank's first and second half."""
    b = a.shape[0] // dp
    grouped = a.reshape(dp, b, *a.shape[1:])
    first = (b + 1) // 2
    return (grouped[:, :first].reshape(-1, *a.shape[1:]), grouped[:, first:].reshape(-1, *a.shape[1:]))


def join(a0, a1, dp: int):
    g0, g1 = a0.reshape(dp, -1, *a0.shape[1:]), a1.reshape(dp, -1, *a1.shape[1:])
    return jnp.concatenate([g0, g1], axis=1).reshape(-1, *a0.shape[1:])


def overlapped_layer(layer, x, cos, sin, cache, index, slots, mask, absorbed: bool, schedule: str):
    """DecoderLayer.__call__ for a MoE layer under EP, with two interleaved micro-batches; None when
    the batch has fewer than two rows per rank. schedule "auto": five_stage for decode (absorbed),
    two_batch for prefill."""
    if schedule == "auto":
        schedule = "five_stage" if absorbed else "two_batch"
    attn, moe = layer.self_attn, layer.mlp
    ep = moe.ep
    dp = ep.mesh.shape[ep.batch_axis]
    if x.shape[0] % dp or x.shape[0] // dp < 2:  # fewer than two rows per rank: nothing to split
        return None
    # Projections and the cache write for both micro-batches at once: cheap, and it keeps one
    # cache update per layer.
    h = layer.input_layernorm(x)
    q_nope, q_pe = attn.queries(h, cos, sin)
    cache = cache.write(index, slots, attn.latents(h, cos, sin))
    in_cache = attn.reads_in_place(cache, absorbed)  # a kernel reads each micro-batch's pages in place
    rows = slots if in_cache else cache.read(index).astype(x.dtype)
    attend = attn.attend_absorbed if absorbed else attn.attend_naive
    parts = [halves(a, dp) for a in (x, q_nope, q_pe, rows, mask, slots >= 0)]
    mb = [tuple(p[i] for p in parts) for i in (0, 1)]  # (x, q_nope, q_pe, rows, mask, valid) per micro-batch

    w = moe.experts.weights()

    def attn_a(i):  # core attention
        _, q_nope, q_pe, rows, mask, _ = mb[i]
        with jax.named_scope(f"mb{i}/attention"):
            if in_cache:  # (rows holds this micro-batch's slots)
                half = cache.select_rows(lambda table: halves(table, dp)[i])
                return attn.attend_in_cache(q_nope, q_pe, half, index, rows)
            return attend(q_nope, q_pe, rows, mask)

    def attn_b(i, core):  # output projection, residual, norm, gate, dispatch
        x, _, _, _, _, valid = mb[i]
        with jax.named_scope(f"mb{i}/dispatch"):
            x = x + attn.o_proj(core.reshape(*x.shape[:-1], -1))
            hn = layer.post_attention_layernorm(x)
            flat = hn.reshape(-1, hn.shape[-1])
            weights, ids = moe.gate(flat)
            d = ep_dispatch(flat, moe.to_physical(ids), weights, valid.reshape(-1), ep, w.gate.shape[0] // ep.ranks,
                            w.fp8)
        return x, hn, d

    def experts(i, d):
        with jax.named_scope(f"mb{i}/experts"):
            return ep_experts(d, w, ep, moe.experts.impl)

    def combine(i, x, hn, d, out):
        with jax.named_scope(f"mb{i}/combine"):
            y = ep_combine(d, out, ep, x.dtype)[:hn.shape[0] * hn.shape[1]].reshape(hn.shape)
            return x + y + moe.shared_experts(hn)

    barrier = jax.lax.optimization_barrier
    if schedule == "two_batch":
        x0, hn0, d0 = attn_b(0, attn_a(0))
        core1, d0 = barrier((attn_a(1), d0))  # attention(1) under dispatch(0)
        x1, hn1, d1 = attn_b(1, core1)
        e0, d1 = barrier((experts(0, d0), d1))  # experts(0) under dispatch(1)
        y0 = combine(0, x0, hn0, d0, e0[0])
        e1, y0 = barrier((experts(1, d1), y0))  # experts(1) under combine(0)
        y1 = combine(1, x1, hn1, d1, e1[0])
    else:  # five_stage
        x0, hn0, d0 = attn_b(0, attn_a(0))
        core1, d0 = barrier((attn_a(1), d0))  # attention(1) under dispatch(0)
        e0, core1 = barrier((experts(0, d0), core1))
        x1, hn1, d1 = attn_b(1, core1)
        y0, d1 = barrier((combine(0, x0, hn0, d0, e0[0]), d1))  # combine(0) beside dispatch(1)
        e1 = experts(1, d1)
        y1 = combine(1, x1, hn1, d1, e1[0])
    s0, s1 = ep_stats(d0, e0[1], e0[2]), ep_stats(d1, e1[1], e1[2])
    stats = {"expert_load": s0["expert_load"] + s1["expert_load"], "rows_sent": s0["rows_sent"] + s1["rows_sent"],
             "overflow": s0["overflow"] | s1["overflow"]}
    return join(y0, y1, dp), cache, stats


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
