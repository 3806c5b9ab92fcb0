"""The decoder layer as named stages.

Axis legend: B batch, S positions in this call, T cache slots, D hidden, H heads, V v_head_dim.

A layer is `prepare` (input norm, queries, this call's latent rows written into the cache, done
once for the whole batch) followed by its stages, each a method that advances one batch's
`LayerState`:

    attention   core attention over the cache (MLA.core)
    gate        output projection + residual, post-attention norm, and for a MoE layer the gate
    dispatch    MoE.dispatch: the all-to-all to the ranks holding each token's experts (EP)
    experts     MoE.run_experts: the routed experts' grouped FFN
    combine     MoE.combine: the rows back, summed per token, + shared expert, + residual
    mlp         a dense layer's MLP + residual (instead of dispatch / experts / combine)

The plain forward runs them in order (`__call__`); the overlap schedules (model/overlap.py) run
the same stages for two micro-batches interleaved.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from model.attention import MLA
from model.config import ModelConfig
from model.layers import MLP, RMSNorm
from model.moe import MoE
from model.overlap import overlapped_layer


@dataclasses.dataclass
class LayerState:
    """One (micro-)batch's values between stages (SGLang's per-batch state); a stage fills what it
    produces and drops what no later stage reads."""
    x: jax.Array  # [B, S, D] the residual stream
    valid: jax.Array  # bool[B, S] (padding positions are not routed)
    slots: jax.Array  # int32[B, S] cache slots (-1: padding)
    q_nope: jax.Array | None = None  # [B, S, H, K]
    q_pe: jax.Array | None = None  # [B, S, H, P]
    keys: object = None  # what core attention reads: rows [B, T, C] or model.attention.InCache
    mask: jax.Array | None = None  # bool[B, S, T]
    core: jax.Array | None = None  # [B, S, H, V] core attention's output
    h: jax.Array | None = None  # [B, S, D] post-attention norm: the FFN's input
    routed: object = None  # model.moe.Routed
    sent: object = None  # model.ep.Dispatched (EP) or the Routed tokens (one device)
    experts_out: tuple | None = None  # (rows out, tokens per physical expert, overflow)
    stats: dict | None = None  # the routed experts' (MoE layers)
    absorbed: bool = False  # decode's MLA form


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
        s, cache = self.prepare(x, cos, sin, cache, layer, slots, mask, absorbed)
        for name, stage in self.stages().items():
            with jax.named_scope(name):
                stage(s)
        return s.x, cache, s.stats

    def stages(self) -> dict:
        """The layer after `prepare`, in order: name -> stage (LayerState -> None, updating it)."""
        if isinstance(self.mlp, MoE):
            return {"attention": self.attention, "gate": self.gate, "dispatch": self.dispatch,
                    "experts": self.experts, "combine": self.combine}
        return {"attention": self.attention, "gate": self.gate, "mlp": self.dense_mlp}

    # ---- stages ------------------------------------------------------------------------------------
    def prepare(self, x, cos, sin, cache, layer, slots, mask, absorbed: bool) -> tuple[LayerState, object]:
        """Input norm, queries and the cache write for the whole batch -> (its LayerState, cache)."""
        attn = self.self_attn
        q_nope, q_pe, cache = attn.prepare(self.input_layernorm(x), cos, sin, cache, layer, slots)
        keys = attn.keys(cache, layer, absorbed, x.dtype)
        return LayerState(x=x, valid=slots >= 0, slots=slots, q_nope=q_nope, q_pe=q_pe, keys=keys, mask=mask,
                          absorbed=absorbed), cache

    def attention(self, s: LayerState) -> None:
        s.core = self.self_attn.core(s.q_nope, s.q_pe, s.keys, s.slots, s.mask, s.absorbed)
        s.q_nope = s.q_pe = s.keys = s.mask = None

    def gate(self, s: LayerState) -> None:
        s.x = s.x + self.self_attn.output(s.core)
        s.h, s.core = self.post_attention_layernorm(s.x), None
        if isinstance(self.mlp, MoE):
            s.routed = self.mlp.route(s.h, s.valid)

    def dispatch(self, s: LayerState) -> None:
        s.sent, s.routed = self.mlp.dispatch(s.routed), None

    def experts(self, s: LayerState) -> None:
        s.experts_out = self.mlp.run_experts(s.sent, s.absorbed)

    def combine(self, s: LayerState) -> None:
        h, s.stats = self.mlp.combine(s.sent, s.experts_out, s.h)
        s.x, s.h, s.sent, s.experts_out = s.x + h, None, None, None

    def dense_mlp(self, s: LayerState) -> None:
        s.x, s.h = s.x + self.mlp(s.h), None
