"""Building blocks: parameter declaration, Linear, RMSNorm, YaRN rotary embedding, SwiGLU MLP.

Axis legend: B batch, S query positions, T key positions, D hidden, H heads, F intermediate.
Weights keep DeepSeek's [out, in] layout, so checkpoint tensors load without transposes and
FP8 128x128 scale blocks keep their meaning. An FP8 Linear (quantization "fp8") holds its weight
as e4m3 with `weight_scale_inv` beside it, as DeepSeek's checkpoint stores it, and quantises its
input 1x128 right before the FP8 GEMM: the deployment's `kernels.gemm` (model/kernels/registry.py),
which takes the weight as it is held.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.kernels import registry
from model.quant import hold_scales, quantize_activations, quantize_blocks

INIT_STD = 0.02  # HF initializer_range; only random-init models (tests, training) see it


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal", rows=None) -> nnx.Param:
    """Declares one weight with its logical axes; shardings, Orbax targets and the loader derive from it.
    `rows` gathers along the first axis after init (replicas of a logical expert share its weights)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    if rows is not None:
        value = value[jnp.asarray(rows)]
    # eager_sharding off: placement is decided once, by sharding.mesh's rule table, not at init.
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Derived(nnx.Variable):
    """A weight computed from checkpoint weights at load (model/attention.py: AbsorbedKV), held beside
    them: not a parameter of the network (param_count, checkpoints and training leave it out)."""


def fp8_param(rngs: nnx.Rngs | None, shape, axes, rows=None) -> tuple[nnx.Param, nnx.Param]:
    """An FP8 weight [..., out, in] (e4m3) and its float32 scale_inv [..., out/128, in/128] in the held
    layout (model/quant.py: hold_scales), from the same random init as `param`. Scales are tiny (1 per
    16K weights): replicated, except along the expert axis, so a device holds the scales of exactly its
    own experts."""
    value = param(rngs, shape, axes, jnp.float32, rows=rows)[...]
    q, scale = quantize_blocks(value, xp=jnp)
    scale = hold_scales(scale, xp=jnp)
    scale_axes = tuple(a if a == "expert" else None for a in axes)
    return (nnx.Param(q, out_sharding=tuple(axes), eager_sharding=False),
            nnx.Param(scale, out_sharding=scale_axes, eager_sharding=False))


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x, w)


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], dtype, rngs, fp8: bool = False):
        if fp8:
            self.weight, self.weight_scale_inv = fp8_param(rngs, (d_out, d_in), axes)  # [out, in], [out/128, >= in/128]
        else:
            self.weight, self.weight_scale_inv = param(rngs, (d_out, d_in), axes, dtype), None
        self.gemm = "xla"  # the deployment's kernels.gemm (DeepseekV3.set_kernels)
        self.ranks = None  # registry.Ranks: where the step's rows live (DeepseekV3.set_expert_parallel)

    def __call__(self, x):
        if self.weight_scale_inv is None:
            return linear(x, self.weight[...])
        w = self.weight[...]
        gemm = registry.gemm_per_rank(self.ranks, self.gemm, "dense", fp8=True, n=w.shape[0], k=w.shape[1])
        out = gemm(quantize_activations(x.reshape(-1, x.shape[-1])), w, self.weight_scale_inv[...], x.dtype)
        return out.reshape(*x.shape[:-1], -1)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axis: str | None = None):
        self.eps = eps
        self.weight = param(None, (dim,), (axis,), dtype, init="ones")

    def __call__(self, x):
        # Statistics in fp32 whatever the activation dtype, as DeepSeek and HF compute them.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: the dense layers and the shared expert."""

    def __init__(self, dim: int, hidden: int, dtype, rngs, fp8: bool = False):
        self.gate_proj = Linear(dim, hidden, ("mlp", "embed"), dtype, rngs, fp8)
        self.up_proj = Linear(dim, hidden, ("mlp", "embed"), dtype, rngs, fp8)
        self.down_proj = Linear(hidden, dim, ("embed", "mlp"), dtype, rngs, fp8)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- rotary embedding ------------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [qk_rope_head_dim // 2], YaRN-corrected when configured (as HF's `yarn` init)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    if cfg.rope_type != "yarn":
        return extrapolation.astype(np.float32)
    interpolation = 1.0 / (cfg.rope_factor * pos_freqs)

    def correction_dim(rotations):
        return dim * math.log(cfg.rope_original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty interval
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    # Low frequencies (long wavelengths) are interpolated, high ones keep their trained values.
    extrapolation_weight = 1 - ramp
    return (interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight).astype(np.float32)


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """positions int32[B, S] -> cos, sin float32[B, S, qk_rope_head_dim // 2]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    scale = cfg.yarn_attention_factor
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates DeepSeek's interleaved pairs (x0, x1), (x2, x3), ...; x [B, S, (H,) R], cos/sin [B, S, R/2]."""
    if x.ndim == cos.ndim + 1:  # per-head input
        cos, sin = cos[..., None, :], sin[..., None, :]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape)
