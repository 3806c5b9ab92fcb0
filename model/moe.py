"""The gate and the MoE block: routed experts plus a shared expert.

Axis legend: N tokens, D hidden, E routed experts, G expert groups, k experts per token,
F moe_intermediate_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import MLP, param


class Gate(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        self.cfg = cfg
        self.weight = param(rngs, (cfg.n_routed_experts, cfg.hidden_size), (None, "embed"), dtype)
        # fp32 always: it is a load-balancing offset learned to ~1e-3 resolution.
        self.e_score_correction_bias = param(None, (cfg.n_routed_experts,), (None,), jnp.float32, init="zeros")

    def __call__(self, x):
        """x [N, D] -> weights float32[N, k], expert ids int32[N, k]."""
        cfg = self.cfg
        N, E, G = x.shape[0], cfg.n_routed_experts, cfg.n_group
        scores = jax.nn.sigmoid(x.astype(jnp.float32) @ self.weight[...].astype(jnp.float32).T)  # [N, E]
        # The bias only steers *which* experts are chosen (auxiliary-loss-free balancing);
        # the weights come from the unbiased scores so the bias never changes the output scale.
        biased = scores + self.e_score_correction_bias[...]
        group_scores = jax.lax.top_k(biased.reshape(N, G, E // G), 2)[0].sum(-1)  # [N, G]
        top_groups = jax.lax.top_k(group_scores, cfg.topk_group)[1]
        group_ok = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], top_groups].set(True)
        biased = jnp.where(jnp.repeat(group_ok, E // G, axis=1), biased, -jnp.inf)
        ids = jax.lax.top_k(biased, cfg.num_experts_per_tok)[1]
        weights = jnp.take_along_axis(scores, ids, axis=1)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids.astype(jnp.int32)


class ExpertLinear(nnx.Module):
    def __init__(self, n: int, d_in: int, d_out: int, axes, dtype, rngs):
        self.weight = param(rngs, (n, d_out, d_in), axes, dtype)  # [E, out, in]


class Experts(nnx.Module):
    """All routed experts of one layer, stacked so one grouped GEMM serves them."""

    def __init__(self, cfg: ModelConfig, dtype, rngs):
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = ExpertLinear(E, D, F, ("expert", "expert_mlp", "embed"), dtype, rngs)
        self.up_proj = ExpertLinear(E, D, F, ("expert", "expert_mlp", "embed"), dtype, rngs)
        self.down_proj = ExpertLinear(E, F, D, ("expert", "embed", "expert_mlp"), dtype, rngs)

    def __call__(self, x, ids, weights):
        return grouped_expert_ffn(x, ids, weights, self.gate_proj.weight[...], self.up_proj.weight[...],
                                  self.down_proj.weight[...])


def grouped_expert_ffn(x, ids, weights, w_gate, w_up, w_down):
    """Every (token, expert) pair through its expert, weighted and summed per token; nothing dropped.

    x [N, D], ids int32[N, k], weights [N, k]; w_gate/w_up [E, F, D], w_down [E, D, F] -> [N, D].
    Rows are sorted by expert so one ragged GEMM covers all experts (the single-device reference).
    """
    N, k = ids.shape
    E = w_gate.shape[0]
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token_of_row = order // k
    rows = x[token_of_row]  # [N*k, D]
    group_sizes = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
    gate = jax.lax.ragged_dot(rows, jnp.swapaxes(w_gate, 1, 2), group_sizes)
    up = jax.lax.ragged_dot(rows, jnp.swapaxes(w_up, 1, 2), group_sizes)
    y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, jnp.swapaxes(w_down, 1, 2), group_sizes)  # [N*k, D]
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[token_of_row].add(y)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        self.gate = Gate(cfg, dtype, rngs)
        self.experts = Experts(cfg, dtype, rngs)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, rngs)

    def __call__(self, x):
        """x [B, S, D] -> [B, S, D]."""
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)
        routed = self.experts(flat, ids, weights)
        return routed.reshape(x.shape) + self.shared_experts(x)
