"""FP8 x FP8 GEMMs with DeepSeek's block scales, as one Mosaic GPU kernel (DeepGEMM's method in Pallas).

Semantics (model/quant.py's formats and XLA references; DeepSeek's inference/kernel.py): activations x_q
float8_e4m3fn with one float32 scale per row per 128 K (x_scale), weights w_q float8_e4m3fn in the
checkpoint's [N, K] layout with one float32 scale per 128 x 128 block (w_scale [.., ceil(N/128), ceil(K/128)],
or the held layout whose K-block axis is padded: model/quant.py held_scale_shape; the padding is never read);

    out[m, n] = sum over K blocks kb of (x_q[m, kb] . w_q[g(m), n, kb]) * x_scale[m, kb] * w_scale[g(m), n // 128, kb]

accumulated in float32. Three layouts, one kernel:
- dense (`fp8_matmul`, every FP8 projection): x [M, K], w [N, K];
- contiguous (`fp8_grouped_matmul`, prefill experts): x [M, K] with rows sorted by group, group_sizes[G];
  rows past the sum are 0;
- masked (`fp8_masked_matmul`, decode experts): x [G, Mmax, K] with counts[G] valid rows per group
  (dispatch's fixed-capacity buffer); rows at or past a group's count are 0.

How (why each piece):
- A CTA owns a [block_m, 128] output tile. One producer warpgroup streams [block_m, 128] activation tiles,
  [128, 128] weight tiles and the tile rows' activation scales through shared memory (TMA, `stages` deep).
  Each consumer warpgroup (64 rows) runs the 128-deep FP8 wgmma into a FRESH f32 accumulator and then adds
  it into its running f32 result times s_x[row] * s_w: the tensor cores' FP8 accumulation is only ~14 bits
  wide, so promoting every 128 K keeps float32 accuracy, and it is where the block scales apply anyway.
  While one consumer promotes, the other's wgmma keeps the tensor cores busy.
- Hopper's FP8 wgmma reads both operands K-major: the weights stay [N, K] (no transpose anywhere);
  x_scale is passed transposed ([K/128, M]) so a tile's scales are one TMA row.
- The weight scale of the next K step is loaded while this step's wgmma runs (DeepGEMM keeps them in
  shared memory; one scalar per step, prefetched, hides the same latency).
- Tails need no padding of either operand: a TMA load past the end of x or w fills zeros (rows past M,
  columns past N, the last partial K block), and a TMA store past the end of the output is clipped.
- Tile order (DeepGEMM's scheduler): output tiles are walked in groups of GROUP_N weight tiles, all row
  tiles of a group before the next, so the CTAs resident at once share a few weight tiles and a few
  activation tiles in L2 (walking all row tiles for one weight tile at a time re-reads the whole
  activation matrix from HBM for every weight tile at prefill).
- Split K (dense layout, few output tiles: decode's projections with M <= 128 rows make 5 to 56 tiles
  for 132 SMs): the K steps are cut into `k_splits` ranges, each CTA writes an f32 partial, and XLA sums
  them (a few MB at most), so every SM streams weights.
- A contiguous-layout tile that holds two groups' rows is visited once per group (the tile map of
  model/kernels/grouped_gemm.py's group_metadata) and each visit stores only its own rows, with TMA
  stores of 64, 32, ..., 1 rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from model.kernels.grouped_gemm import group_metadata
from model.quant import check_scale_shape
from model.kernels.mosaic import CONSUMER_REGS, PRODUCER_REGS, interpret_params, mma, tiled_smem

FP8 = jnp.float8_e4m3fn
BLOCK = 128  # scale block along K and N: one K step and one output tile width
WG_ROWS = 64  # rows per consumer warpgroup (wgmma M)
GROUP_N = 8  # weight tiles per raster group (DeepGEMM: 8 or 16)
NUM_SMS = 132  # H100 SXM and H200: what split K fills
MIN_SPLIT_STEPS = 4  # K steps per split at least: enough to fill a 4-stage pipeline


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(x_q, x_scale, w_q, w_scale, sizes, x_rows_shape, block_m, out_dtype):
    G, N, K = w_q.shape
    if x_q.dtype != FP8 or w_q.dtype != FP8:
        raise ValueError(f"x_q and w_q must be float8_e4m3fn, got {x_q.dtype} and {w_q.dtype}.")
    if x_q.shape[-1] != K:
        raise ValueError(f"x_q has K={x_q.shape[-1]} but w_q has K={K}.")
    # TMA reads and writes rows whose byte strides are multiples of 16
    if K % 16 or (N * jnp.dtype(out_dtype).itemsize) % 16:
        raise ValueError(f"the FP8 kernel needs K a multiple of 16 and N x {jnp.dtype(out_dtype).itemsize} output "
                         f"bytes a multiple of 16 (TMA row strides), got N={N}, K={K}.")
    nb, kb = _cdiv(N, BLOCK), _cdiv(K, BLOCK)
    if x_scale.shape != (*x_rows_shape, kb) or x_scale.dtype != jnp.float32:
        raise ValueError(f"x_scale must be float32 {(*x_rows_shape, kb)} (one per row per 128 K), "
                         f"got {x_scale.dtype} {x_scale.shape}.")
    if w_scale.dtype != jnp.float32:
        raise ValueError(f"w_scale must be float32 (one per 128x128 block), got {w_scale.dtype}.")
    check_scale_shape(w_q.shape, w_scale.shape if w_scale.ndim == 3 else (1, *w_scale.shape))  # (real or held)
    if sizes is not None and sizes.shape != (G,):
        raise ValueError(f"group sizes must be int32[{G}], one per group of w_q, got shape {sizes.shape}.")
    if block_m not in (64, 128):
        raise ValueError(f"block_m must be 64 or 128 (one or two consumer warpgroups), got {block_m}.")


def fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.bfloat16, *, block_m: int | None = None,
               k_splits: int | None = None, stages: int = 4, num_sms: int = NUM_SMS, interpret: bool = False):
    """Dense: x_q [M, K] fp8, x_scale f32 [M, ceil(K/128)], w_q [N, K] fp8, w_scale f32 [ceil(N/128),
    ceil(K/128)] -> [M, N] out_dtype (model/quant.py's fp8_matmul). block_m: 64 up to 64 rows, else 128;
    k_splits: by default enough K ranges to give num_sms CTAs when the output has fewer tiles."""
    M, K = x_q.shape
    if w_q.ndim != 2:
        raise ValueError(f"w_q must be [N, K], got shape {w_q.shape}.")
    block_m = block_m or (64 if M <= 64 else 128)
    _check(x_q, x_scale, w_q[None], w_scale, None, (M,), block_m, out_dtype)
    steps, tiles = _cdiv(K, BLOCK), _cdiv(M, block_m) * _cdiv(w_q.shape[0], BLOCK)
    if k_splits is None:
        k_splits = max(1, min(num_sms // tiles, steps // MIN_SPLIT_STEPS))
    k_splits = max(1, min(k_splits, steps))
    row0 = jnp.arange(_cdiv(M, block_m), dtype=jnp.int32) * block_m
    meta = (jnp.zeros_like(row0), row0, row0, row0 + block_m, jnp.full_like(row0, M))
    partial_dtype = out_dtype if k_splits == 1 else jnp.float32
    out = _call(x_q, _scales_t(x_scale, block_m), w_q[None], w_scale[None], meta, partial_dtype, block_m, stages,
                k_splits, interpret)
    return out[0] if k_splits == 1 else out.sum(0).astype(out_dtype)


def fp8_grouped_matmul(x_q, x_scale, w_q, w_scale, group_sizes, out_dtype=jnp.bfloat16, *, block_m: int = 128,
                       stages: int = 4, interpret: bool = False):
    """Contiguous layout: x_q [M, K] fp8 (rows sorted by group), x_scale f32 [M, K/128], w_q [G, N, K] fp8,
    w_scale f32 [G, N/128, K/128], group_sizes int32[G] (sum <= M) -> [M, N] out_dtype (rows past the sum 0)."""
    group_sizes = jnp.asarray(group_sizes)
    M, _ = x_q.shape
    _check(x_q, x_scale, w_q, w_scale, group_sizes, (M,), block_m, out_dtype)
    g, row0, lo, hi = group_metadata(group_sizes.astype(jnp.int32), M, block_m)
    valid = jnp.where(g < w_q.shape[0], hi, lo)  # the tail group (rows past the sum) stores zeros
    out = _call(x_q, _scales_t(x_scale, block_m), w_q, w_scale, (g, row0, lo, hi, valid), out_dtype, block_m,
                stages, 1, interpret)
    return out[0]


def fp8_masked_matmul(x_q, x_scale, w_q, w_scale, counts, out_dtype=jnp.bfloat16, *, block_m: int = 128,
                      stages: int = 4, interpret: bool = False):
    """Masked layout: x_q [G, Mmax, K] fp8, x_scale f32 [G, Mmax, K/128], w_q [G, N, K] fp8, w_scale
    f32 [G, N/128, K/128], counts int32[G] -> [G, Mmax, N] out_dtype (rows at or past counts[g] are 0)."""
    counts = jnp.asarray(counts)
    G, Mmax, K = x_q.shape
    _check(x_q, x_scale, w_q, w_scale, counts, (G, Mmax), block_m, out_dtype)
    if Mmax % block_m:
        raise ValueError(f"the masked layout needs Mmax a multiple of block_m={block_m}, got {Mmax}.")
    tiles = Mmax // block_m
    v = jnp.arange(G * tiles, dtype=jnp.int32)
    g = v // tiles
    row0 = g * Mmax + (v % tiles) * block_m  # rows of the flattened [G * Mmax, K] activations
    valid = g * Mmax + jnp.clip(counts.astype(jnp.int32), 0, Mmax)[g]
    out = _call(x_q.reshape(G * Mmax, K), _scales_t(x_scale.reshape(G * Mmax, -1), block_m), w_q, w_scale,
                (g, row0, row0, row0 + block_m, valid), out_dtype, block_m, stages, 1, interpret)
    return out.reshape(G, Mmax, -1)


def _scales_t(x_scale, block_m):
    """[M, Kb] -> [Kb, whole row tiles]: one TMA row of scales per tile and K step, always in bounds."""
    M = x_scale.shape[0]
    return jnp.pad(x_scale.T, ((0, 0), (0, _cdiv(M, block_m) * block_m - M)), constant_values=1.0)


def _raster(t, num_visits: int, n_tiles: int):
    """Tile number -> (visit, weight tile): GROUP_N weight tiles at a time, every visit of a group before
    the next group, the group's weight tiles fastest."""
    per_group = num_visits * GROUP_N
    group = t // per_group
    first = group * GROUP_N
    width = jnp.minimum(GROUP_N, n_tiles - first)
    r = t - group * per_group
    return r // width, first + lax.rem(r, width)


def _kernel(group_ref, row0_ref, lo_ref, hi_ref, valid_ref, x_ref, xs_ref, w_ref, ws_ref, o_ref,
            x_smem, w_smem, xs_smem, o_smem, full, free, *, stages: int, k_splits: int):
    wg = lax.axis_index("wg")
    num_visits, n_tiles = group_ref.shape[0], _cdiv(w_ref.shape[1], BLOCK)
    tile = lax.axis_index("tile")
    split, t = lax.div(tile, num_visits * n_tiles), lax.rem(tile, num_visits * n_tiles)
    v, j = _raster(t, num_visits, n_tiles)
    consumers = x_smem.shape[1] // WG_ROWS
    num_groups, total = w_ref.shape[0], xs_ref.shape[0]
    k0, k1 = lax.div(split * total, k_splits), lax.div((split + 1) * total, k_splits)  # this CTA's K steps
    g, lo, hi, valid = group_ref[v], lo_ref[v], hi_ref[v], valid_ref[v]
    row0 = pl.multiple_of(row0_ref[v], x_smem.shape[1])  # tile-aligned: lets TMA and layouts use it
    active = (g < num_groups) & (lo < valid)  # else this visit stores zeros (or nothing)
    steps = jnp.where(active, k1 - k0, 0)
    expert = jnp.minimum(g, num_groups - 1)
    cols = pl.ds(pl.multiple_of(j * BLOCK, BLOCK), BLOCK)

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")  # always: the consumers' increase waits for it

        @pl.loop(0, steps)
        def _(i):
            slot = lax.rem(i, stages)

            @pl.when(i >= stages)
            def _():
                plgpu.barrier_wait(free.at[slot])
            ks = pl.ds(pl.multiple_of((k0 + i) * BLOCK, BLOCK), BLOCK)
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(row0, x_smem.shape[1]), ks], x_smem.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(w_ref.at[expert, cols, ks], w_smem.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(xs_ref.at[k0 + i, pl.ds(row0, x_smem.shape[1])], xs_smem.at[slot],
                                    full.at[slot])

    @pl.when(wg < consumers)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGS, action="increase")
        rows = pl.ds(pl.multiple_of(wg * WG_ROWS, WG_ROWS), WG_ROWS)
        zeros = plgpu.layout_cast(jnp.zeros((WG_ROWS, BLOCK), jnp.float32), plgpu.Layout.WGMMA)
        w_scale = lambda i: ws_ref[expert, j, k0 + jnp.minimum(i, steps - 1)]

        def step(i, carry):  # acc f32 [64, 128]: this warpgroup's rows of the tile
            acc, s_w = carry
            s_w_next = w_scale(i + 1)  # in flight while this step's wgmma runs
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(full.at[slot])
            part = mma(x_smem.at[slot, rows], w_smem.at[slot].T, (WG_ROWS, BLOCK))  # fresh accumulator: FP8 sums
            s_x = plgpu.load(xs_smem.at[slot, rows], layout=plgpu.Layout.WGMMA.reduce(1))
            scale = s_x * s_w  # [64] f32: promotion and block scales in one multiply

            @pl.when(i + stages < steps)  # nobody waits for the last stages' release
            def _():
                plgpu.barrier_arrive(free.at[slot])
            return acc + part * lax.broadcast_in_dim(scale, part.shape, [0]), s_w_next

        acc = lax.cond(active, lambda: lax.fori_loop(0, steps, step, (zeros, w_scale(0)))[0], lambda: zeros)
        first = pl.multiple_of(row0 + wg * WG_ROWS, WG_ROWS)  # this warpgroup's first row
        r = first + plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, BLOCK), 0, layout=plgpu.Layout.WGMMA)
        o_smem[rows] = jnp.where(r < valid, acc, 0.0).astype(o_smem.dtype)  # rows past the group's end: 0
        plgpu.commit_smem()
        # store rows [lo, hi) of this warpgroup's 64 as TMA stores of 64, 32, ..., 1 rows (static shapes);
        # rows and columns past the output's end are clipped by the TMA unit
        a = jnp.clip(lo - first, 0, WG_ROWS)
        n = jnp.clip(hi - first, 0, WG_ROWS) - a
        size = WG_ROWS
        while size:
            take = (n & size) != 0

            @pl.when(take)
            def _(a=a, size=size):
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(wg * WG_ROWS + a, size)],
                                        o_ref.at[split, pl.ds(first + a, size), cols])
            a = a + jnp.where(take, size, 0)
            size //= 2
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "stages", "k_splits", "interpret"))
def _call(x_q, x_scale_t, w_q, w_scale, meta, out_dtype, block_m, stages, k_splits, interpret):
    """x_q [M, K] fp8, x_scale_t f32 [Kb, Mp], w_q [G, N, K], w_scale [G, Nb, Kb], meta (group, row0, lo, hi,
    valid) int32[V] -> [k_splits, M, N]."""
    (M, K), N = x_q.shape, w_q.shape[1]
    stages = max(1, min(stages, _cdiv(_cdiv(K, BLOCK), k_splits)))
    tiles = meta[0].shape[0] * _cdiv(N, BLOCK) * k_splits
    kernel = plgpu.kernel(
        functools.partial(_kernel, stages=stages, k_splits=k_splits),
        out_type=jax.ShapeDtypeStruct((k_splits, M, N), out_dtype),
        scratch_types=(
            tiled_smem((stages, block_m, BLOCK), FP8),  # x_smem
            tiled_smem((stages, BLOCK, BLOCK), FP8),  # w_smem
            plgpu.SMEM((stages, block_m), jnp.float32),  # xs_smem
            plgpu.SMEM((block_m, BLOCK), out_dtype),  # o_smem: untiled, so stores may start at any row
            plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # full: x, w and x-scale copies landed
            plgpu.Barrier(num_arrivals=block_m // WG_ROWS, num_barriers=stages),  # free: every consumer is done
        ),
        grid=(tiles,),
        grid_names=("tile",),
        num_threads=block_m // WG_ROWS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),  # no reductions
        interpret=interpret_params(interpret),
        kernel_name="fp8_gemm",
    )
    return kernel(*meta, x_q, x_scale_t, w_q, w_scale)
