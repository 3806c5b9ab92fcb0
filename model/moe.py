"""The gate and the MoE block: routed experts plus a shared expert.

Axis legend: N tokens, D hidden, E logical routed experts, P physical experts (E + redundant
replicas of hot experts), G expert groups, k experts per token, F moe_intermediate_size.

The block runs as stages, which the decoder layer's schedules compose (model/decoder.py,
model/overlap.py): route (gate + physical slots), plan (under EP: the wire buffer, model/ep.py),
dispatch (the all-to-all to the ranks holding the chosen experts), run_experts (the grouped FFN), combine (the reverse
all-to-all), land (each token's returns summed), and the shared expert (`shared_experts`, its own
stage).
On one device dispatch passes the routed tokens through and combine / land only reshape.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.ep import Dispatched, ep_combine, ep_dispatch, ep_experts, ep_land, ep_plan, ep_stats
from model.experts import Experts, expert_layout, grouped_ffn
from model.kernels import registry
from model.layers import MLP, param


class Gate(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        self.cfg = cfg
        self.weight = param(rngs, (cfg.n_routed_experts, cfg.hidden_size), (None, "embed"), dtype)
        # fp32 always: it is a load-balancing offset learned to ~1e-3 resolution.
        self.e_score_correction_bias = param(None, (cfg.n_routed_experts,), (None,), jnp.float32, init="zeros")

    def __call__(self, x):
        """x [N, D] -> weights float32[N, k], logical expert ids int32[N, k]."""
        return gate_topk(x, self.weight[...], self.e_score_correction_bias[...], self.cfg)


def gate_topk(x, weight, bias, cfg: ModelConfig):
    """The gate on the weights as values (a rank's shard_map takes them as arguments): x [N, D],
    weight [E, D], bias float32[E] -> weights float32[N, k], logical expert ids int32[N, k]."""
    N, E, G = x.shape[0], cfg.n_routed_experts, cfg.n_group
    # float32 products and sums of the activations' dtype (DeepSeek: bf16 inputs, float32 scores),
    # on the weight as held: a converted copy of it would be a copy of the layer's weight every step
    scores = jax.nn.sigmoid(jnp.einsum("nd,ed->ne", x, weight.astype(x.dtype),
                                       preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST))
    # The bias only steers *which* experts are chosen (auxiliary-loss-free balancing);
    # the weights come from the unbiased scores so the bias never changes the output scale.
    biased = scores + bias
    group_scores = _top2_sum(biased.reshape(N, G, E // G))  # [N, G]
    top_groups = jax.lax.top_k(group_scores, cfg.topk_group)[1]  # [N, topk_group]
    # Elementwise (no scatter), so under EP each rank routes its own tokens: a scatter here made
    # the partitioner gather every rank's scores.
    group_ok = jnp.any(top_groups[:, :, None] == jnp.arange(G)[None, None, :], axis=1)  # [N, G]
    biased = jnp.where(jnp.repeat(group_ok, E // G, axis=1), biased, -jnp.inf)
    ids = jax.lax.top_k(biased, cfg.num_experts_per_tok)[1]
    weights = jnp.take_along_axis(scores, ids, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids.astype(jnp.int32)


def _top2_sum(v):
    """[..., n] -> the sum of the two largest along the last axis: top_k(v, 2)[0].sum(-1), without
    top_k on a 3-D operand (XLA:GPU flattens it to 2-D and the partitioner then gathers every
    rank's rows: routing must stay where the tokens are)."""
    first = jnp.argmax(v, axis=-1)[..., None]
    m1 = jnp.take_along_axis(v, first, axis=-1)[..., 0]
    m2 = jnp.max(jnp.where(jnp.arange(v.shape[-1]) == first, -jnp.inf, v), axis=-1)
    return m1 + m2


def to_physical(ids, index, log2phy, logcnt):
    """Logical ids [N, k] -> physical slots, spreading the tokens of a replicated expert round-robin
    over its replicas by index int32[N], each token's place in the whole batch (a rank routing its own
    rows passes theirs, so every rank picks as the whole batch would); log2phy [E, P-E+1], logcnt [E]."""
    k = ids.shape[1]
    turn = (index[:, None] * k + jnp.arange(k)[None, :]) % logcnt[ids]
    return log2phy[ids, turn]


class ExpertMap(nnx.Variable):
    """Where each logical expert lives among the physical slots; set by EPLB, never trained."""


def default_placement(n_logical: int, n_physical: int) -> dict[str, np.ndarray]:
    """Slot p holds expert p % E: the redundant slots replicate experts 0, 1, ... until EPLB,
    which sees real loads, decides. Shapes as DeepSeek's EPLB: phy2log [P], log2phy [E, P-E+1]
    (padded with -1), logcnt [E]."""
    if n_physical < n_logical:
        raise ValueError(f"{n_physical} physical experts cannot hold {n_logical} logical experts")
    phy2log = np.arange(n_physical) % n_logical
    log2phy = np.full((n_logical, n_physical - n_logical + 1), -1, np.int32)
    logcnt = np.bincount(phy2log, minlength=n_logical).astype(np.int32)
    for e in range(n_logical):
        slots = np.flatnonzero(phy2log == e)
        log2phy[e, :len(slots)] = slots
    return {"phy2log": phy2log.astype(np.int32), "log2phy": log2phy, "logcnt": logcnt}


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs, n_physical: int | None = None, fp8: bool = False,
                 placement: dict | None = None):
        """placement: the expert maps to start from (default_placement's form); default: default_placement."""
        placement = placement or default_placement(cfg.n_routed_experts, n_physical or cfg.n_routed_experts)
        self.gate = Gate(cfg, dtype, rngs)
        self.experts = Experts(cfg, placement["phy2log"], dtype, rngs, fp8)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, rngs, fp8)
        for name, value in placement.items():
            setattr(self, name, ExpertMap(jnp.asarray(value), out_sharding=(None,) * value.ndim,
                                          eager_sharding=False))
        self.ep = None  # sharding.ep.EPConfig when the experts are spread over a mesh (model/ep.py)

    def to_physical(self, ids):
        """Logical ids [N, k] -> physical slots (`to_physical`)."""
        return to_physical(ids, jnp.arange(ids.shape[0]), self.log2phy[...], self.logcnt[...])

    def __call__(self, x, valid):
        """x [B, S, D] (normalised), valid bool[B, S] -> ([B, S, D], stats of the routed experts)."""
        sent = self.dispatch(self.plan(self.route(x, valid)))
        out, stats = self.run_experts(sent, x.shape[1] == 1)
        return self.land(sent, self.combine(sent, out, x.dtype), x.shape, x.dtype) + self.shared_experts(x), stats

    # ---- stages ------------------------------------------------------------------------------------
    def route(self, x, valid) -> "Routed":
        """x [B, S, D], valid bool[B, S] -> each token's experts (physical slots) and gate weights."""
        flat = x.reshape(-1, x.shape[-1])

        def route(flat, index, weight, bias, log2phy, logcnt):  # (a rank's) tokens -> gate weights, slots
            weights, ids = gate_topk(flat, weight, bias, self.gate.cfg)
            return weights, to_physical(ids, index, log2phy, logcnt)
        # Under EP each rank routes its own tokens (one shard_map): left to XLA's partitioner, the gate's
        # top_k calls gathered every rank's scores, two all-gathers per MoE layer (measured on cpu8).
        ranks = None if self.ep is None else registry.Ranks(self.ep.mesh, self.ep.batch_axis)
        args = (flat, jnp.arange(flat.shape[0], dtype=jnp.int32), self.gate.weight[...],
                self.gate.e_score_correction_bias[...], self.log2phy[...], self.logcnt[...])
        weights, ids = registry.per_rank(ranks, route, args, (0, 0, None, None, None, None), 0)
        return Routed(flat, weights, ids, valid.reshape(-1))

    def plan(self, routed: "Routed") -> "Routed | Dispatched":
        """Under EP: where each token goes, its rows packed for the wire (model/ep.py: ep_plan); on
        one device: the tokens as they are."""
        if self.ep is None:
            return routed
        w = self.experts.weights()
        return ep_plan(routed.x, routed.ids, routed.weights, routed.valid, self.ep, w.gate.shape[0] // self.ep.ranks,
                       w.fp8)

    def dispatch(self, planned: "Routed | Dispatched") -> "Routed | Dispatched":
        """Under EP: the all-to-all, -> every device's received rows; on one device: as they are."""
        return planned if self.ep is None else ep_dispatch(planned, self.ep)

    def run_experts(self, sent, decode: bool = False):
        """The routed-expert FFN over what dispatch delivered -> (rows out, stats: expert_load [P]
        tokens per physical expert, rows_sent [R], overflow (per EP rank: bool[R])). decode: a decode
        step's (the kernels' masked layout)."""
        gemm = self.experts.gemm
        if self.ep is not None:
            out, load, overflow = ep_experts(sent, self.experts.weights(), self.ep, gemm, decode)
            return out, ep_stats(sent, load, overflow)
        out, load, _ = grouped_ffn(sent.x, jnp.where(sent.valid[:, None], sent.ids, -1), sent.weights,
                                   self.experts.weights(), expert_layout(gemm, False, decode), gemm=gemm)
        return out, {"expert_load": load, "rows_sent": jnp.zeros((1,), jnp.int32), "overflow": jnp.bool_(False)}

    def combine(self, sent, out, dtype):
        """Under EP: the routed experts' rows out back to their senders, as received (reads no weight:
        a schedule may run it in the next layer's step, model/overlap.py); on one device: as they are."""
        return out if self.ep is None else ep_combine(sent, out, self.ep, dtype)

    def land(self, sent, back, shape, dtype):
        """What combine received, summed per token -> [B, S, D] = shape."""
        if self.ep is not None:
            back = ep_land(sent, back, self.ep, dtype)[:math.prod(shape[:-1])]  # less the dp padding
        return back.astype(dtype).reshape(shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routed:
    """Tokens with their routing, flattened: what the dispatch sends."""
    x: jax.Array  # [N, D]
    weights: jax.Array  # float32[N, k] gate weights
    ids: jax.Array  # int32[N, k] physical expert slots
    valid: jax.Array  # bool[N] (padding tokens are not sent)


def move_experts(moe_stack, phy2log, log2phy, logcnt) -> None:
    """Re-places a stacked MoE module's routed experts: slot p of layer l takes logical expert
    phy2log[l, p]'s weights (and, for FP8 experts, their scales), copied from a slot that holds that
    expert now. One compiled program moves every weight, the source slots its data: any placement
    reuses it (compiled once per weights' layout, by the engine's warm-up). The gather keeps each
    weight's sharding, so XLA moves the rows between devices; replicas are exact copies, so no output
    changes."""
    mlp = moe_stack.mlp
    src = np.take_along_axis(np.asarray(mlp.log2phy[...])[:, :, 0], np.asarray(phy2log), axis=1)  # [L, R]
    held = [var for proj in (mlp.experts.gate_proj, mlp.experts.up_proj, mlp.experts.down_proj)
            for var in (proj.weight, proj.weight_scale_inv) if var is not None]
    # [L, R, out, in], float32 [L, R, out/128, in/128]
    weights = tuple(var[...] for var in held)
    moved = _slot_gather(tuple(w.sharding for w in weights))(weights, jnp.asarray(src, jnp.int32))
    for var, w in zip(held, moved):
        var.set_value(w)  # (not var[...] = w: the old value is donated, and indexing it would read it)
    for name, value in (("phy2log", phy2log), ("log2phy", log2phy), ("logcnt", logcnt)):
        var = getattr(mlp, name)
        var.set_value(jax.device_put(np.asarray(value, np.int32), var[...].sharding))


@functools.lru_cache(maxsize=None)
def _slot_gather(shardings: tuple):
    """weights ([L, R, ...] each), src int32[L, R] -> each weight with slot r of layer l taken from
    slot src[l, r]; the old weights are donated (a move never holds two copies of the experts)."""
    def gather(weights, src):
        return tuple(jnp.take_along_axis(w, src[:, :, None, None], axis=1) for w in weights)
    return jax.jit(gather, out_shardings=shardings, donate_argnums=0)
