"""Grouped GEMM for routed experts: `lax.ragged_dot` with optional FP8 block-scaled weights.

out[r] = x[r] @ w[g(r)] for the rows r of group g (rows sorted by group, group_sizes[g] of each);
rows past sum(group_sizes) are zeros. Two implementations, one contract:
- "xla": dequantise w, then `lax.ragged_dot` (every backend; the reference);
- "pallas": a Triton-style `pl.pallas_call` (GPU; `interpret=True` runs it on CPU) that keeps the
  weights in FP8 in memory and dequantises each tile inside the kernel. On H100 XLA's ragged_dot
  reached ~85 TFLOP/s and the Mosaic-GPU ragged dot in jax.experimental.pallas.ops.gpu ~450
  (bf16 only; neither reads FP8 + block scales).

FP8 layout: w float8_e4m3fn [G, K, N] with w_scale float32 [G, ceil(K/128), ceil(N/128)]; the real
weight is w[g, k, n] * w_scale[g, k // 128, n // 128] (model/quant.py's 128x128 format applied to
the [K, N] matrix of each expert). A checkpoint's `weight [N, K]` / `scale_inv [N/128, K/128]`
maps onto it by swapping the last two axes of both.

Pallas tiling (megablox's `make_group_metadata`, adapted to a parallel GPU grid): rows are cut
into block_m tiles; a tile that straddles a group boundary is visited once per group it holds,
and each visit stores only its own group's rows (a masked store), so no two programs write the
same element and no tile mixes two experts' weights. Rows past sum(group_sizes) form one extra
"tail" group whose visits store zeros. Grid = (visits, N tiles); visits <= cdiv(M, bm) + G.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from model.quant import FP8, WEIGHT_BLOCK, dequantize_blocks

SCALE_BLOCK = WEIGHT_BLOCK[0]  # 128: square weight blocks, one float32 scale each
IMPLS = ("pallas", "xla")


def _check(x, w, group_sizes, w_scale, impl, block_m, block_n, block_k):
    """Raises ValueError (one sentence) for inputs that the kernel would silently mis-read."""
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} must be one of {IMPLS}.")
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"x must be [M, K] and w [G, K, N], got shapes {x.shape} and {w.shape}.")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but w has K={w.shape[1]} (w must be [G, K, N]).")
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == FP8:
        raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}.")
    if group_sizes.shape != (w.shape[0],):
        raise ValueError(f"group_sizes must have shape ({w.shape[0]},), one per group of w, got {group_sizes.shape}.")
    G, K, N = w.shape
    if (w.dtype == FP8) != (w_scale is not None):
        raise ValueError(f"w_scale must be given exactly when w is float8_e4m3fn (w is {w.dtype}).")
    want = (G, math.ceil(K / SCALE_BLOCK), math.ceil(N / SCALE_BLOCK))
    if w_scale is not None and tuple(w_scale.shape) != want:
        raise ValueError(f"w_scale must have shape {want} (one per 128x128 block of w), got {tuple(w_scale.shape)}.")
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):  # Triton tiles are powers of two; tl.dot needs >= 16
            raise ValueError(f"{name}={b} must be a power of two >= 16.")
    if w_scale is not None and (SCALE_BLOCK % block_n or SCALE_BLOCK % block_k):
        raise ValueError(f"block_n and block_k must divide {SCALE_BLOCK} for FP8 weights, so a tile has one scale.")


def group_metadata(group_sizes, m: int, block_m: int):
    """group_sizes int32[G] -> (tile_group, tile_row0, row_lo, row_hi), each int32[V], V = cdiv(m, bm) + G.

    Visit v computes rows [tile_row0, tile_row0 + bm) against expert tile_group[v] and stores only
    rows [row_lo, row_hi). tile_group == G is the zero tail; visits with row_lo == row_hi are idle
    (the static grid is an upper bound). Pure jnp, so it runs inside jit before the kernel.
    """
    G = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)  # sum > m is clipped at m
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    starts = jnp.concatenate([starts, ends[-1:]])  # [G+1]: group G = the tail, rows [sum, m)
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    first = starts // block_m
    visits = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)  # tiles each group touches
    cum = jnp.cumsum(visits)  # [G+1]
    V = pl.cdiv(m, block_m) + G  # each boundary between nonempty groups shares at most one tile
    v = jnp.arange(V, dtype=jnp.int32)
    g = jnp.searchsorted(cum, v, side="right").astype(jnp.int32)  # G+1 for idle visits
    idle = g > G
    g = jnp.minimum(g, G)
    row0 = (first[g] + v - (cum[g] - visits[g])) * block_m
    lo = jnp.where(idle, 0, jnp.maximum(starts[g], row0))
    hi = jnp.where(idle, 0, jnp.minimum(ends[g], row0 + block_m))
    return g, jnp.where(idle, 0, row0), lo, hi


def _kernel(tile_group_ref, tile_row0_ref, row_lo_ref, row_hi_ref, x_ref, w_ref, *rest,
            num_groups: int, block_m: int, block_n: int, block_k: int, fp8: bool):
    # Whole-array refs: x [M, Kp], w [G, Kp, Np] (Kp, Np padded to the tiles), w_scale [G, Kb, Nb],
    # out [M, Np]. Program (v, j) computes out rows [row0, row0 + bm) x cols [j*bn, (j+1)*bn).
    s_ref, o_ref = rest if fp8 else (None, *rest)
    v, j = pl.program_id(0), pl.program_id(1)
    g = tile_group_ref[v]
    row0 = pl.multiple_of(tile_row0_ref[v], block_m)
    col0 = pl.multiple_of(j * block_n, block_n)
    rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    mine = (rows >= row_lo_ref[v]) & (rows < row_hi_ref[v])  # [bm, 1]: rows of this visit's group
    expert = jnp.minimum(g, num_groups - 1)  # the tail (g == G) must still index a real expert

    def k_step(kk, acc):  # acc f32 [bm, bn]
        k0 = pl.multiple_of(kk * block_k, block_k)
        # Other groups' rows read as 0 (and rows past M are never touched on the GPU).
        xt = pltriton.load(x_ref.at[pl.ds(row0, block_m), pl.ds(k0, block_k)], mask=mine, other=0.0)
        wt = w_ref[expert, pl.ds(k0, block_k), pl.ds(col0, block_n)]  # [bk, bn]
        # e4m3 -> bf16 is exact; the tile's single scale multiplies the [bm, bn] partial product
        # instead of the [bk, bn] weights: same value, fewer multiplies, no rounding of w * s.
        part = jnp.dot(xt, wt.astype(xt.dtype), preferred_element_type=jnp.float32)
        if fp8:
            part = part * s_ref[expert, lax.div(k0, SCALE_BLOCK), lax.div(col0, SCALE_BLOCK)]
        return acc + part

    n_k = x_ref.shape[1] // block_k  # static trip count: an scf.for that Triton can pipeline
    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    # Idle visits and the tail skip the K loop; the tail then stores zeros.
    active = (g < num_groups) & (row_lo_ref[v] < row_hi_ref[v])
    acc = lax.cond(active, lambda: lax.fori_loop(0, n_k, k_step, zeros), lambda: zeros)
    pltriton.store(o_ref.at[pl.ds(row0, block_m), pl.ds(col0, block_n)], acc.astype(o_ref.dtype), mask=mine)


def _pad_to(a, axis: int, multiple: int):
    """Zero-pads one axis up to a multiple (a no-op for DeepSeek's dims, all multiples of 128)."""
    pad = -a.shape[axis] % multiple
    if not pad:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths)


def _pallas(x, w, group_sizes, w_scale, *, block_m, block_n, block_k, interpret):
    M, K = x.shape
    G, _, N = w.shape
    # Zero-padding K keeps padded products at 0 (x's pad is 0, and w's pad is 0, never NaN
    # garbage); padding N gives whole column tiles. Both stay inside the last scale block.
    x_p = _pad_to(x, 1, block_k)
    w_p = _pad_to(_pad_to(w, 1, block_k), 2, block_n)
    Np = w_p.shape[2]
    meta = group_metadata(group_sizes, M, block_m)
    kernel = functools.partial(_kernel, num_groups=G, block_m=block_m, block_n=block_n,
                               block_k=block_k, fp8=w_scale is not None)
    operands = (*meta, x_p, w_p) + ((w_scale.astype(jnp.float32),) if w_scale is not None else ())
    out = pl.pallas_call(
        kernel,
        grid=(meta[0].shape[0], Np // block_n),  # no BlockSpecs: each program sees whole arrays
        out_shape=jax.ShapeDtypeStruct((M, Np), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="grouped_matmul",
    )(*operands)
    return out[:, :N]


def _xla(x, w, group_sizes, w_scale):
    if w_scale is not None:
        w = dequantize_blocks(w, w_scale, WEIGHT_BLOCK, jnp.float32, jnp)
    out = lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                         preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def grouped_matmul(x, w, group_sizes, w_scale=None, *, impl: str = "xla", block_m: int = 64,
                   block_n: int = 128, block_k: int = 64, interpret: bool = False):
    """x [M, K] bf16/f32 (rows sorted by group), w [G, K, N] bf16/f32 or float8_e4m3fn with
    w_scale f32 [G, ceil(K/128), ceil(N/128)], group_sizes int32[G] (sum <= M) -> [M, N] x.dtype.

    Equals `lax.ragged_dot(x, dequantised w, group_sizes)` with f32 accumulation; rows past
    sum(group_sizes) are 0. impl: "pallas" (Triton-style kernel; GPU, or CPU with
    interpret=True) or "xla" (ragged_dot; the registry names it). block_*: the
    kernel's tiles, powers of two >= 16; with FP8 weights block_n and block_k must divide 128.
    """
    group_sizes = jnp.asarray(group_sizes)
    _check(x, w, group_sizes, w_scale, impl, block_m, block_n, block_k)
    if impl == "xla":
        return _xla(x, w, group_sizes, w_scale)
    return _pallas(x, w, group_sizes, w_scale, block_m=block_m, block_n=block_n, block_k=block_k,
                   interpret=interpret)
