"""The decoder layer as named stages.

Axis legend: B batch, S positions in this call, T cache slots, D hidden, H heads, V v_head_dim.

A layer is its stages, each a method that advances one (micro-)batch's `LayerState`:

    prepare     input norm, queries, this call's latent rows written into the cache (DeepSeek's ATTN-0)
    attention   core attention over the cache (MLA.core)
    gate        output projection + residual, post-attention norm
    route       a MoE layer's gate: each token's experts and weights
    plan        MoE.plan: where each token goes, its rows packed for the wire (EP)
    dispatch    MoE.dispatch: the all-to-all to the ranks holding each token's experts (EP)
    experts     MoE.run_experts: the routed experts' grouped FFN
    shared      the shared expert
    combine     MoE.combine: the rows back to their senders (EP)
    land        MoE.land: the rows summed per token; with the shared expert's output, the residual
    mlp         a dense layer's MLP + residual (instead of plan ... land)

The plain forward runs them in order (`__call__`); the overlap schedules (model/overlap.py) run
the same stages for two micro-batches interleaved, across layers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import MLA
from model.config import ModelConfig
from model.layers import MLP, RMSNorm
from model.moe import MoE
from model.overlap import CacheRef, overlapped_layer


@dataclasses.dataclass
class LayerState:
    """One (micro-)batch's values between stages (SGLang's per-batch state); a stage fills what it
    produces and drops what no later stage reads."""
    x: jax.Array  # [B, S, D] the residual stream
    valid: jax.Array  # bool[B, S] (padding positions are not routed)
    slots: jax.Array  # int32[B, S] cache slots (-1: padding)
    cos: jax.Array  # [B, S, P/2] rotary embedding at this batch's positions
    sin: jax.Array
    mask: jax.Array  # bool[B, S, T]
    absorbed: bool = False  # decode's MLA form
    part: object = None  # model.overlap.Part: which micro-batch of the step's rows (None: all of them)
    q_nope: jax.Array | None = None  # [B, S, H, K]
    q_pe: jax.Array | None = None  # [B, S, H, P]
    keys: object = None  # what core attention reads: rows [B, T, C] or model.attention.InCache
    core: jax.Array | None = None  # [B, S, H, V] core attention's output
    h: jax.Array | None = None  # [B, S, D] post-attention norm: the FFN's input
    routed: object = None  # model.moe.Routed
    sent: object = None  # model.ep.Dispatched (EP) or the Routed tokens (one device)
    experts_out: jax.Array | None = None  # the routed experts' rows out
    shared: jax.Array | None = None  # [B, S, D] the shared expert's output
    back: jax.Array | None = None  # the routed experts' rows as the combine received them
    y: jax.Array | None = None  # [B, S, D] the routed experts' output, summed per token
    stats: dict | None = None  # the routed experts' (MoE layers)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, dtype, rngs, n_physical: int | None = None, fp8: bool = False,
                 placement: dict | None = None):
        D = cfg.hidden_size
        self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.self_attn = MLA(cfg, dtype, rngs, fp8)
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.mlp = (MoE(cfg, dtype, rngs, n_physical, fp8, placement) if moe
                    else MLP(D, cfg.intermediate_size, dtype, rngs, fp8))

    def __call__(self, x, cos, sin, cache, layer, slots, mask, absorbed):
        """-> (x, cache, routed-expert stats or None for a dense layer)."""
        ep = self.mlp.ep if isinstance(self.mlp, MoE) else None
        if ep is not None and ep.overlap != "none":
            out = overlapped_layer(self, x, cos, sin, cache, layer, slots, mask, absorbed, ep.overlap)
            if out is not None:
                return out
        ref = CacheRef(cache, layer)
        s = self.state(x, cos, sin, slots, mask, absorbed)
        for name, stage in self.stages(ref).items():
            with jax.named_scope(name):
                stage(s)
        return s.x, ref.cache, s.stats

    @staticmethod
    def state(x, cos, sin, slots, mask, absorbed: bool, part=None, **carried) -> LayerState:
        """A (micro-)batch before the layer's first stage (carried: what a lagging one brings along)."""
        return LayerState(x=x, valid=slots >= 0, slots=slots, cos=cos, sin=sin, mask=mask, absorbed=absorbed,
                          part=part, **carried)

    def stages(self, ref: CacheRef) -> dict:
        """The layer, in order: name -> stage (LayerState -> None, updating it)."""
        prepare = functools.partial(self.prepare, ref=ref)
        if isinstance(self.mlp, MoE):
            return {"prepare": prepare, "attention": self.attention, "gate": self.gate, "route": self.route,
                    "plan": self.plan, "dispatch": self.dispatch,
                    "experts": self.experts, "shared": self.shared, "combine": self.combine, "land": self.land}
        return {"prepare": prepare, "attention": self.attention, "gate": self.gate, "mlp": self.dense_mlp}

    # ---- stages ------------------------------------------------------------------------------------
    def prepare(self, s: LayerState, ref: CacheRef) -> None:
        """Input norm, queries, and this batch's latent rows written into the cache (a micro-batch
        writes its own rows and reads its own: model/overlap.py Part)."""
        attn = self.self_attn
        h = self.input_layernorm(s.x)
        s.q_nope, s.q_pe = attn.queries(h, s.cos, s.sin)
        rows = attn.latents(h, s.cos, s.sin)
        if s.part is None:
            ref.cache = ref.cache.write(ref.layer, s.slots, rows)
            view = ref.cache
        else:
            ref.cache = s.part.write(ref.cache, ref.layer, s.slots, rows)
            view = s.part.view(ref.cache)
        s.keys = attn.keys(view, ref.layer, s.absorbed, s.x.dtype)

    def attention(self, s: LayerState) -> None:
        s.core = self.self_attn.core(s.q_nope, s.q_pe, s.keys, s.slots, s.mask, s.absorbed)
        s.q_nope = s.q_pe = s.keys = None

    def gate(self, s: LayerState) -> None:
        s.x = s.x + self.self_attn.output(s.core)
        s.h, s.core = self.post_attention_layernorm(s.x), None

    def route(self, s: LayerState) -> None:
        s.routed = self.mlp.route(s.h, s.valid)

    def plan(self, s: LayerState) -> None:
        s.sent, s.routed = self.mlp.plan(s.routed), None

    def dispatch(self, s: LayerState) -> None:
        s.sent = self.mlp.dispatch(s.sent)

    def experts(self, s: LayerState) -> None:
        s.experts_out, s.stats = self.mlp.run_experts(s.sent, s.absorbed)

    def shared(self, s: LayerState) -> None:
        s.shared, s.h = self.mlp.shared_experts(s.h), None
        self._residual(s)

    def combine(self, s: LayerState) -> None:
        s.back, s.experts_out = self.mlp.combine(s.sent, s.experts_out, s.x.dtype), None

    def land(self, s: LayerState) -> None:
        s.y = self.mlp.land(s.sent, s.back, s.x.shape, s.x.dtype)
        s.sent = s.back = None
        self._residual(s)

    @staticmethod
    def _residual(s: LayerState) -> None:
        """x + (routed + shared) once both are in, whichever stage came last (the same sums in every order)."""
        if s.y is not None and s.shared is not None:
            s.x, s.y, s.shared = s.x + (s.y + s.shared), None, None

    def dense_mlp(self, s: LayerState) -> None:
        s.x, s.h = s.x + self.mlp(s.h), None


def stack_layers(make_layer, n: int, rngs):
    """n layers of one kind as one module whose arrays lead with a "layers" axis (None when n is 0)."""
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return make_layer(r)

    return make(rngs)


def scan_layers(stack, x, cos, sin, cache, layer0, slots, mask, absorbed):
    """-> x, cache, per-layer stats stacked on a leading L axis."""
    graphdef, params = nnx.split(stack)

    def body(carry, layer_params):
        x, cache, layer = carry
        x, cache, stats = nnx.merge(graphdef, layer_params)(x, cos, sin, cache, layer, slots, mask, absorbed)
        return (x, cache, layer + 1), stats

    (x, cache, _), stats = jax.lax.scan(body, (x, cache, jnp.int32(layer0)), params)
    return x, cache, stats
