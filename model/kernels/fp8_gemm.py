"""FP8 x FP8 grouped GEMM with DeepSeek's block scales, as a Mosaic GPU kernel (DeepGEMM's method in Pallas).

Semantics (model/quant.py's formats; DeepSeek's inference/kernel.py): activations x_q float8_e4m3fn with
one float32 scale per row per 128 K (x_scale), weights w_q float8_e4m3fn in the checkpoint's [N, K]
layout with one float32 scale per 128 x 128 block (w_scale [G, N/128, K/128]);

    out[m, n] = sum over K blocks kb of (x_q[m, kb] . w_q[g(m), n, kb]) * x_scale[m, kb] * w_scale[g(m), n/128, kb]

accumulated in float32. Two layouts, one kernel:
- contiguous (prefill): x [M, K] with rows sorted by group, group_sizes[G]; rows past the sum are 0;
- masked (decode): x [G, Mmax, K] with counts[G] valid rows per group (dispatch's fixed-capacity buffer);
  rows at or past a group's count are 0.

How (why each piece): a CTA owns a [block_m, 128] output tile. One producer warpgroup streams
[block_m, 128] activation tiles, [128, 128] weight tiles and the tile rows' scales through shared memory
(TMA, `stages` deep). Each consumer warpgroup (64 rows) runs the 128-deep FP8 wgmma into a FRESH f32
accumulator and then adds it into its running f32 result times s_x[row] * s_w: the tensor cores'
FP8 accumulation is only ~14 bits wide, so promoting every 128 K keeps float32 accuracy, and it is where
the block scales apply anyway. Hopper's FP8 wgmma reads both operands K-major: the weights stay [N, K]
(no transpose anywhere); x_scale is passed transposed ([K/128, M]) so a tile's scales are one TMA row.
While one consumer promotes, the other's wgmma keeps the tensor cores busy.

A contiguous-layout tile that holds two groups' rows is visited once per group (the tile map of
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
from model.kernels.mosaic import CONSUMER_REGS, PRODUCER_REGS, interpret_params, mma, tiled_smem

FP8 = jnp.float8_e4m3fn
BLOCK = 128  # scale block along K and N: one K step and one output tile width
WG_ROWS = 64  # rows per consumer warpgroup (wgmma M)


def _check(x_q, x_scale, w_q, w_scale, sizes, x_rows_shape, block_m):
    G, N, K = w_q.shape
    if x_q.dtype != FP8 or w_q.dtype != FP8:
        raise ValueError(f"x_q and w_q must be float8_e4m3fn, got {x_q.dtype} and {w_q.dtype}.")
    if K % BLOCK or N % BLOCK:
        raise ValueError(f"the FP8 kernel needs K and N multiples of {BLOCK}, got w_q [G, N, K] = {w_q.shape}.")
    if x_q.shape[-1] != K:
        raise ValueError(f"x_q has K={x_q.shape[-1]} but w_q [G, N, K] has K={K}.")
    if x_scale.shape != (*x_rows_shape, K // BLOCK) or x_scale.dtype != jnp.float32:
        raise ValueError(f"x_scale must be float32 {(*x_rows_shape, K // BLOCK)} (one per row per 128 K), "
                         f"got {x_scale.dtype} {x_scale.shape}.")
    if w_scale.shape != (G, N // BLOCK, K // BLOCK) or w_scale.dtype != jnp.float32:
        raise ValueError(f"w_scale must be float32 {(G, N // BLOCK, K // BLOCK)} (one per 128x128 block), "
                         f"got {w_scale.dtype} {w_scale.shape}.")
    if sizes.shape != (G,):
        raise ValueError(f"group sizes must be int32[{G}], one per group of w_q, got shape {sizes.shape}.")
    if block_m not in (64, 128):
        raise ValueError(f"block_m must be 64 or 128 (one or two consumer warpgroups), got {block_m}.")


def fp8_grouped_matmul(x_q, x_scale, w_q, w_scale, group_sizes, out_dtype=jnp.bfloat16, *, block_m: int = 128,
                       stages: int = 4, interpret: bool = False):
    """Contiguous layout: x_q [M, K] fp8 (rows sorted by group), x_scale f32 [M, K/128], w_q [G, N, K] fp8,
    w_scale f32 [G, N/128, K/128], group_sizes int32[G] (sum <= M) -> [M, N] out_dtype (rows past the sum 0)."""
    group_sizes = jnp.asarray(group_sizes)
    M, K = x_q.shape
    _check(x_q, x_scale, w_q, w_scale, group_sizes, (M,), block_m)
    Mp = -(-M // block_m) * block_m  # whole row tiles (a no-op for the engine's power-of-two buckets)
    x_q, x_scale = jnp.pad(x_q, ((0, Mp - M), (0, 0))), jnp.pad(x_scale, ((0, Mp - M), (0, 0)))
    g, row0, lo, hi = group_metadata(group_sizes.astype(jnp.int32), Mp, block_m)
    valid = jnp.where(g < w_q.shape[0], hi, lo)  # the tail group (rows past the sum) stores zeros
    out = _call(x_q, x_scale.T, w_q, w_scale, (g, row0, lo, hi, valid), out_dtype, block_m, stages, interpret)
    return out[:M]


def fp8_masked_matmul(x_q, x_scale, w_q, w_scale, counts, out_dtype=jnp.bfloat16, *, block_m: int = 128,
                      stages: int = 4, interpret: bool = False):
    """Masked layout: x_q [G, Mmax, K] fp8, x_scale f32 [G, Mmax, K/128], w_q [G, N, K] fp8, w_scale
    f32 [G, N/128, K/128], counts int32[G] -> [G, Mmax, N] out_dtype (rows at or past counts[g] are 0)."""
    counts = jnp.asarray(counts)
    G, Mmax, K = x_q.shape
    _check(x_q, x_scale, w_q, w_scale, counts, (G, Mmax), block_m)
    if Mmax % block_m:
        raise ValueError(f"the masked layout needs Mmax a multiple of block_m={block_m}, got {Mmax}.")
    tiles = Mmax // block_m
    v = jnp.arange(G * tiles, dtype=jnp.int32)
    g = v // tiles
    row0 = g * Mmax + (v % tiles) * block_m  # rows of the flattened [G * Mmax, K] activations
    valid = g * Mmax + jnp.clip(counts.astype(jnp.int32), 0, Mmax)[g]
    out = _call(x_q.reshape(G * Mmax, K), x_scale.reshape(G * Mmax, -1).T, w_q, w_scale,
                (g, row0, row0, row0 + block_m, valid), out_dtype, block_m, stages, interpret)
    return out.reshape(G, Mmax, -1)


def _kernel(group_ref, row0_ref, lo_ref, hi_ref, valid_ref, x_ref, xs_ref, w_ref, ws_ref, o_ref,
            x_smem, w_smem, xs_smem, o_smem, full, free, *, stages: int):
    v, j, wg = lax.axis_index("visit"), lax.axis_index("n"), lax.axis_index("wg")
    consumers = x_smem.shape[1] // WG_ROWS
    num_groups, steps = w_ref.shape[0], x_ref.shape[1] // BLOCK
    g, lo, hi, valid = group_ref[v], lo_ref[v], hi_ref[v], valid_ref[v]
    row0 = pl.multiple_of(row0_ref[v], x_smem.shape[1])  # tile-aligned: lets TMA and layouts use it
    active = (g < num_groups) & (lo < valid)  # else this visit stores zeros (or nothing)
    expert = jnp.minimum(g, num_groups - 1)
    cols = pl.ds(pl.multiple_of(j * BLOCK, BLOCK), BLOCK)

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")  # always: the consumers' increase waits for it

        @pl.loop(0, jnp.where(active, steps, 0))
        def _(k):
            slot = lax.rem(k, stages)

            @pl.when(k >= stages)
            def _():
                plgpu.barrier_wait(free.at[slot])
            ks = pl.ds(pl.multiple_of(k * BLOCK, BLOCK), BLOCK)
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(row0, x_smem.shape[1]), ks], x_smem.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(w_ref.at[expert, cols, ks], w_smem.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(xs_ref.at[k, pl.ds(row0, x_smem.shape[1])], xs_smem.at[slot], full.at[slot])

    @pl.when(wg < consumers)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGS, action="increase")
        rows = pl.ds(pl.multiple_of(wg * WG_ROWS, WG_ROWS), WG_ROWS)
        zeros = plgpu.layout_cast(jnp.zeros((WG_ROWS, BLOCK), jnp.float32), plgpu.Layout.WGMMA)

        def step(k, acc):  # acc f32 [64, 128]: this warpgroup's rows of the tile
            slot = lax.rem(k, stages)
            plgpu.barrier_wait(full.at[slot])
            part = mma(x_smem.at[slot, rows], w_smem.at[slot].T, (WG_ROWS, BLOCK))  # fresh accumulator: FP8 sums
            s_x = plgpu.load(xs_smem.at[slot, rows], layout=plgpu.Layout.WGMMA.reduce(1))
            scale = s_x * ws_ref[expert, j, k]  # [64] f32: promotion and block scales in one multiply

            @pl.when(k + stages < steps)  # nobody waits for the last stages' release
            def _():
                plgpu.barrier_arrive(free.at[slot])
            return acc + part * lax.broadcast_in_dim(scale, part.shape, [0])

        acc = lax.cond(active, lambda: lax.fori_loop(0, steps, step, zeros), lambda: zeros)
        first = pl.multiple_of(row0 + wg * WG_ROWS, WG_ROWS)  # this warpgroup's first row
        r = first + plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, BLOCK), 0, layout=plgpu.Layout.WGMMA)
        o_smem[rows] = jnp.where(r < valid, acc, 0.0).astype(o_smem.dtype)  # rows past the group's end: 0
        plgpu.commit_smem()
        # store rows [lo, hi) of this warpgroup's 64 as TMA stores of 64, 32, ..., 1 rows (static shapes)
        a = jnp.clip(lo - first, 0, WG_ROWS)
        n = jnp.clip(hi - first, 0, WG_ROWS) - a
        size = WG_ROWS
        while size:
            take = (n & size) != 0

            @pl.when(take)
            def _(a=a, size=size):
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(wg * WG_ROWS + a, size)],
                                        o_ref.at[pl.ds(first + a, size), cols])
            a = a + jnp.where(take, size, 0)
            size //= 2
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "stages", "interpret"))
def _call(x_q, x_scale_t, w_q, w_scale, meta, out_dtype, block_m, stages, interpret):
    """x_q [Mp, K] fp8, x_scale_t f32 [K/128, Mp], meta (group, row0, lo, hi, valid) int32[V] -> [Mp, N]."""
    (Mp, K), N = x_q.shape, w_q.shape[1]
    stages = max(1, min(stages, K // BLOCK))
    kernel = plgpu.kernel(
        functools.partial(_kernel, stages=stages),
        out_type=jax.ShapeDtypeStruct((Mp, N), out_dtype),
        scratch_types=(
            tiled_smem((stages, block_m, BLOCK), FP8),  # x_smem
            tiled_smem((stages, BLOCK, BLOCK), FP8),  # w_smem
            plgpu.SMEM((stages, block_m), jnp.float32),  # xs_smem
            plgpu.SMEM((block_m, BLOCK), out_dtype),  # o_smem: untiled, so stores may start at any row
            plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # full: x, w and x-scale copies landed
            plgpu.Barrier(num_arrivals=block_m // WG_ROWS, num_barriers=stages),  # free: every consumer is done
        ),
        grid=(meta[0].shape[0], N // BLOCK),  # visits fastest: concurrent CTAs share a weight tile in L2
        grid_names=("visit", "n"),
        num_threads=block_m // WG_ROWS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),  # no reductions
        interpret=interpret_params(interpret),
        kernel_name="fp8_grouped_gemm",
    )
    return kernel(*meta, x_q, x_scale_t, w_q, w_scale)
