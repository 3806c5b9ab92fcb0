"""FP8 e4m3 as DeepSeek serves it: the block format and the GEMMs that consume it.

Format: weights [N, K] (the checkpoint's [out, in]) carry one float32 `scale_inv` per 128x128
block; activations [..., K] one per token per 128 channels (1x128), computed right before the GEMM
that consumes them. A block's scale is its max |value| / 448 (e4m3's largest finite value).
`quantize_blocks` serves both (numpy on the host for checkpoint I/O, jax.numpy inside jit).

GEMMs (DeepSeek-V3 inference/kernel.py semantics): per 128-wide K block b,
    out[m, n] = sum_b (x_q[m, b] . w_q[n, b]) * x_scale[m, b] * w_scale[n // 128, b]
accumulated in float32. Three layouts, one contract each (the Pallas kernels in model/kernels/
implement the same signatures):
    fp8_matmul          x [M, K] x w [N, K]                      dense projections
    fp8_grouped_matmul  x [M, K] rows sorted by group x w [G, N, K]   contiguous layout (prefill)
    fp8_masked_matmul   x [G, Mmax, K] x w [G, N, K], counts [G]     masked layout (decode)
Block scaling is linear, so the sum above equals dequantise-then-multiply in float32: the XLA
implementations here do exactly that. They are the references, and the "xla" entries of the kernel
registry (model/kernels/registry.py), which maps a deployment's `kernels.gemm` to the implementation
that runs (on GPU the Mosaic FP8 kernels of model/kernels/fp8_gemm.py, which never make a float copy
of a weight).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sharding.deployment import QUANTIZATIONS, check_quantization  # noqa: F401 (a deployment field; re-exported)

FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # 448
BLOCK = 128  # DeepSeek's block edge: weights 128x128, activations 1x128
WEIGHT_BLOCK = (BLOCK, BLOCK)
ACTIVATION_BLOCK = (1, BLOCK)
HIGHEST = jax.lax.Precision.HIGHEST  # the reference must not run its float32 dots in TF32 on a GPU


def _blocked(x, block, xp):
    """[..., M, N] -> zero-padded [..., M/bm, bm, N/bn, bn]."""
    *lead, M, N = x.shape
    bm, bn = block
    pm, pn = math.ceil(M / bm) * bm, math.ceil(N / bn) * bn
    if (pm, pn) != (M, N):
        x = xp.pad(x, [(0, 0)] * len(lead) + [(0, pm - M), (0, pn - N)])
    return x.reshape(*lead, pm // bm, bm, pn // bn, bn)


def quantize_blocks(x, block=WEIGHT_BLOCK, xp=np):
    """x float[..., M, N] -> (e4m3 [..., M, N], scale_inv float32[..., ceil(M/bm), ceil(N/bn)])."""
    *lead, M, N = x.shape
    blocks = _blocked(x.astype(xp.float32), block, xp)
    amax = xp.max(xp.abs(blocks), axis=(-3, -1))
    scale_inv = xp.where(amax > 0, amax / FP8_MAX, 1.0).astype(xp.float32)
    q = xp.clip(blocks / scale_inv[..., :, None, :, None], -FP8_MAX, FP8_MAX).astype(FP8)
    q = q.reshape(*lead, blocks.shape[-4] * block[0], blocks.shape[-2] * block[1])[..., :M, :N]
    return q, scale_inv


def dequantize_blocks(q, scale_inv, block=WEIGHT_BLOCK, dtype=np.float32, xp=np):
    """Inverse of quantize_blocks: e4m3 [..., M, N] x scale_inv [..., M/bm, N/bn] -> dtype[..., M, N]."""
    *lead, M, N = q.shape
    blocks = _blocked(q.astype(xp.float32), block, xp)
    x = blocks * scale_inv.astype(xp.float32)[..., :, None, :, None]
    return x.reshape(*lead, blocks.shape[-4] * block[0], blocks.shape[-2] * block[1])[..., :M, :N].astype(dtype)


def scale_shape(shape, block=WEIGHT_BLOCK) -> tuple[int, ...]:
    *lead, M, N = shape
    return (*lead, math.ceil(M / block[0]), math.ceil(N / block[1]))


# ---- the block scales as held on device ------------------------------------------------------------
# XLA hands a kernel one layer's slice of a scanned stack in place only when the slice's size is a
# multiple of 256 bytes; else it copies the slice every step (docs/DESIGN_NOTES.md). A weight's scales
# [N/128, K/128] float32 are held with the K-block axis padded so that they fill whole 256-byte units
# (DeepSeek's q_a_proj [12, 56] -> [12, 64], kv_a_proj [5, 56] -> [5, 64]; most keep their shape). The
# padding is made once, where scales are made or loaded (`hold_scales`), and never read: every GEMM
# reads the K blocks of its K only. Checkpoints store the real shape (`real_scales`).
SLICE_BYTES = 256


def held_scale_shape(shape, block=WEIGHT_BLOCK) -> tuple[int, ...]:
    """The held scales of a weight [..., N, K]: [..., ceil(N/128), Kb] with Kb >= ceil(K/128) the least
    that makes one matrix's scales a multiple of 256 bytes."""
    *lead, nb, kb = scale_shape(shape, block)
    per_unit = SLICE_BYTES // 4
    step = per_unit // math.gcd(nb, per_unit)
    return (*lead, nb, -(-kb // step) * step)


def hold_scales(scale, xp=np):
    """Real scales float32 [..., Nb, Kb] -> the held layout (K-block axis padded with ones, never read)."""
    *lead, nb, kb = scale.shape
    pad = held_scale_shape((nb * BLOCK, kb * BLOCK))[-1] - kb
    return xp.pad(scale, [(0, 0)] * (len(lead) + 1) + [(0, pad)], constant_values=1.0) if pad else scale


def real_scales(scale, k: int):
    """Held (or real) scales [..., Nb, Kb'] of a weight with K columns -> the real [..., Nb, ceil(K/128)]."""
    return scale[..., :math.ceil(k / BLOCK)]


def check_scale_shape(w_shape, s_shape, what: str = "w_scale") -> None:
    """The one scale-shape rule of every FP8 GEMM: real (scale_shape) or held (held_scale_shape)."""
    if tuple(s_shape) not in (scale_shape(w_shape), held_scale_shape(w_shape)):
        raise ValueError(f"{what} {tuple(s_shape)} must hold one scale per 128x128 block of the weight "
                         f"{tuple(w_shape)}: {scale_shape(w_shape)} (or {held_scale_shape(w_shape)} as held).")


def default_quantization(requested: str | None, fp8_checkpoint: bool, platform: str) -> str:
    """The rule: what was asked for; unasked, "fp8" on a GPU (the deployment's platform) when the
    checkpoint is FP8 (FP8 GEMMs pay there), "none" otherwise (elsewhere an FP8 GEMM is emulated and
    only adds rounding)."""
    if requested is None:
        return "fp8" if fp8_checkpoint and platform == "gpu" else "none"
    check_quantization(requested)
    return requested


# ---- inside jit ------------------------------------------------------------------------------------

def quantize_activations(x):
    """x float[..., K] -> (x_q e4m3 [..., K], x_scale float32 [..., ceil(K/128)]): per token per 128 channels."""
    K = x.shape[-1]
    nb = -(-K // BLOCK)
    xb = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, nb * BLOCK - K)])
    xb = xb.reshape(*x.shape[:-1], nb, BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(xb / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q.reshape(*x.shape[:-1], nb * BLOCK)[..., :K], scale


def _expand(scale, n: int, axis: int):
    """Repeats each block's scale over its (up to) 128 positions along `axis`, cut to n."""
    return jax.lax.slice_in_dim(jnp.repeat(scale, BLOCK, axis=axis), 0, n, axis=axis)


def dequantize_activations(x_q, x_scale, dtype=jnp.float32):
    """Inverse of quantize_activations (the product rounded once, in float32, then cast)."""
    return (x_q.astype(jnp.float32) * _expand(x_scale, x_q.shape[-1], -1)).astype(dtype)


def dequantize_weight(w_q, w_scale, dtype=jnp.float32):
    """e4m3 [..., N, K] with float32 [..., N/128, K/128] (real or held) -> dtype [..., N, K]. Elementwise against
    broadcast scales (no reshape into blocks), so a weight sharded along N or K stays sharded."""
    N, K = w_q.shape[-2:]
    scale = _expand(_expand(w_scale.astype(jnp.float32), N, -2), K, -1)
    return (w_q.astype(jnp.float32) * scale).astype(dtype)


def _operands(x_q, x_scale, w_q, w_scale):
    """Both operands dequantised to float32 (the reference's exact products)."""
    return dequantize_activations(x_q, x_scale), dequantize_weight(w_q, w_scale)


def _check(x_q, x_scale, w_q, w_scale, x_rank: int, w_rank: int):
    if x_q.dtype != FP8 or w_q.dtype != FP8:
        raise ValueError(f"x_q and w_q must be float8_e4m3fn, got {x_q.dtype} and {w_q.dtype}.")
    if x_q.ndim != x_rank or w_q.ndim != w_rank or x_q.shape[-1] != w_q.shape[-1]:
        raise ValueError(f"x_q {x_q.shape} and w_q {w_q.shape} must be {x_rank}-D and {w_rank}-D with one K.")
    if tuple(x_scale.shape) != (*x_q.shape[:-1], -(-x_q.shape[-1] // BLOCK)):
        raise ValueError(f"x_scale {x_scale.shape} must hold one scale per 128 values of x_q {x_q.shape}.")
    check_scale_shape(w_q.shape, w_scale.shape)


def fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype):
    """x_q e4m3 [M, K], x_scale f32 [M, K/128], w_q e4m3 [N, K], w_scale f32 [N/128, K/128] -> [M, N]."""
    _check(x_q, x_scale, w_q, w_scale, 2, 2)
    x, w = _operands(x_q, x_scale, w_q, w_scale)
    out = jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32, precision=HIGHEST)
    return out.astype(out_dtype)


def fp8_grouped_matmul(x_q, x_scale, w_q, w_scale, group_sizes, out_dtype):
    """Contiguous layout: x_q e4m3 [M, K] (rows sorted by group, group_sizes int32[G] of each, sum <= M),
    x_scale f32 [M, K/128], w_q e4m3 [G, N, K], w_scale f32 [G, N/128, K/128] -> [M, N]; rows past
    sum(group_sizes) are 0."""
    _check(x_q, x_scale, w_q, w_scale, 2, 3)
    x, w = _operands(x_q, x_scale, w_q, w_scale)
    out = jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), jnp.asarray(group_sizes, jnp.int32),
                             preferred_element_type=jnp.float32, precision=HIGHEST)
    return out.astype(out_dtype)


def fp8_masked_matmul(x_q, x_scale, w_q, w_scale, counts, out_dtype):
    """Masked layout: x_q e4m3 [G, Mmax, K] of which group g uses its first counts[g] rows, x_scale f32
    [G, Mmax, K/128], w_q e4m3 [G, N, K], w_scale f32 [G, N/128, K/128] -> [G, Mmax, N]; rows at or
    past counts[g] are 0."""
    _check(x_q, x_scale, w_q, w_scale, 3, 3)
    x, w = _operands(x_q, x_scale, w_q, w_scale)
    out = jnp.einsum("gmk,gnk->gmn", x, w, preferred_element_type=jnp.float32, precision=HIGHEST)
    used = jnp.arange(x_q.shape[1])[None, :] < jnp.asarray(counts)[:, None]  # [G, Mmax]
    return jnp.where(used[..., None], out, 0).astype(out_dtype)
