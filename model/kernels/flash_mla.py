"""Paged MLA decode (weight-absorbed form) as a Mosaic GPU kernel, FlashMLA's structure in Pallas.

Axis legend (as in model/kernels/mla_decode.py): B batch rows, H heads, R kv_lora_rank, P rope dim,
C = R + P cache width, NB blocks in the pool, BS tokens per block, MB blocks per row (page table width),
N parts of the KV split (CTAs per head block), S partial slots (N + B - 1).

Why this shape (docs/KERNELS.md has the numbers): absorbed decode with 128 heads is compute-bound on
Hopper, so each page must feed as many heads as one CTA can hold. A CTA takes 64 heads (one warpgroup's
wgmma M) and streams its share of KV in 64-token chunks through two shared-memory stages (TMA, one
producer warpgroup that keeps 40 registers). FlashMLA's seesaw: a row's chunks go in pairs, the even
chunk to stage 0 and the odd one to stage 1; math warpgroup w computes the scores Q[64, C] . chunk[64, C]^T
of the chunk in stage w and the online softmax, and accumulates columns [w R/2, (w + 1) R/2) of the
[64, R] f32 context for BOTH chunks (a [64, 512] f32 accumulator is one warpgroup's whole register file).
Its own P multiplies its chunk's latent half from registers; the other warpgroup's P arrives in bf16
through shared memory, written into the rope columns of that warpgroup's stage (free once its scores are
done: no separate P buffer). Warpgroup 0 publishes its chunk's running max m0; warpgroup 1 takes the
pair's max m1 and the factor exp2(m0 - m1), so both halves and both partial sums end relative to m1.
Each warpgroup thus does one chunk's scores and two half-products per pair: equal work. Each page is read
once per 64-head block, and V is the same shared-memory chunk as K. Shared memory: Q 72 KiB + two stages
of 72 KiB + 1 KiB of row statistics = 217 KiB of Hopper's 227.

The KV split: `plan_decode` cuts the concatenation of every row's chunks into N contiguous parts of
equal cost (each row segment costs a fixed overhead on top of its chunks), once per step, from the
lengths alone; every layer reuses the plan. Part p's segment of row b writes its unnormalised
context, running max and sum into slot p + b (p + b is distinct for distinct segments because a part
walks rows in order), and `combine` merges each row's slots by their log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from model.kernels.mosaic import CONSUMER_REGS, PRODUCER_REGS, interpret_params, mma, mma_chain, tiled_smem

CHUNK = 64  # tokens per pipeline stage: the scores' wgmma N and the context's wgmma K
HEADS = 64  # heads per CTA: one warpgroup's wgmma M
ROW_OVERHEAD = 2  # a row segment's fixed cost in chunks (Q load, epilogue, one more partial to combine)
LOG2E = math.log2(math.e)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The KV split of one decode step, shared by every layer (all int32, on device).

    Chunks are numbered through the concatenation of the rows: row b holds global chunks
    [row_chunk[b], row_chunk[b + 1]). Part p takes global chunks [part_chunk[p], part_chunk[p + 1]),
    which lie in rows part_rows[p, 0] .. part_rows[p, 1] (an empty part has part_rows[p, 1] < [p, 0]).
    Row b's partial results are in slots [row_slot[b, 0], row_slot[b, 1]] (inclusive); slot_row[s] is the
    row slot s belongs to (B: a slot no segment writes), what `combine` merges by (made with the plan,
    once per step: its searches are loops on a GPU).
    """
    part_chunk: jax.Array  # [N + 1]
    part_rows: jax.Array  # [N, 2]
    row_chunk: jax.Array  # [B + 1]
    row_slot: jax.Array  # [B, 2]
    slot_row: jax.Array  # [N + B - 1]

    @property
    def num_parts(self) -> int:
        return self.part_rows.shape[0]

    @property
    def num_slots(self) -> int:
        return self.num_parts + self.row_slot.shape[0] - 1


def plan_decode(lengths, num_parts: int, *, row_overhead: int = ROW_OVERHEAD) -> DecodePlan:
    """lengths int32[B] (>= 1) -> the balanced split over num_parts CTAs per head block.

    Pure jnp (runs inside the jitted step, once per step). num_parts: how many CTAs one head block
    may occupy, e.g. the GPU's SM count // head blocks (132 // 2 on an H100 with 128 heads).
    """
    lengths = lengths.astype(jnp.int32)
    chunks = (jnp.maximum(lengths, 1) + CHUNK - 1) // CHUNK  # [B]
    zero = jnp.zeros(1, jnp.int32)
    row_chunk = jnp.concatenate([zero, jnp.cumsum(chunks)]).astype(jnp.int32)  # [B + 1]
    cost = jnp.concatenate([zero, jnp.cumsum(chunks + row_overhead)]).astype(jnp.int32)  # [B + 1]
    budget = (cost[-1] + num_parts - 1) // num_parts
    x = jnp.minimum(jnp.arange(num_parts + 1, dtype=jnp.int32) * budget, cost[-1])  # part starts in cost units
    row = jnp.clip(jnp.searchsorted(cost, x, side="right") - 1, 0, lengths.shape[0] - 1)
    # a start inside a row's overhead moves to the row's first chunk; the end point maps to the last chunk
    within = jnp.clip(x - cost[row] - row_overhead, 0, chunks[row])
    part_chunk = (row_chunk[row] + within).at[-1].set(row_chunk[-1]).astype(jnp.int32)  # [N + 1], nondecreasing
    row_of = lambda g: (jnp.searchsorted(row_chunk, g, side="right") - 1).astype(jnp.int32)
    first_row = row_of(part_chunk[:-1])
    last_row = jnp.where(part_chunk[1:] > part_chunk[:-1], row_of(part_chunk[1:] - 1), first_row - 1)
    part_of = lambda g: (jnp.searchsorted(part_chunk, g, side="right") - 1).astype(jnp.int32)
    b = jnp.arange(lengths.shape[0], dtype=jnp.int32)
    row_slot = jnp.stack([part_of(row_chunk[:-1]) + b, part_of(row_chunk[1:] - 1) + b], axis=1)
    B = lengths.shape[0]
    s = jnp.arange(num_parts + B - 1, dtype=jnp.int32)
    row = jnp.searchsorted(row_slot[:, 1], s, side="left").astype(jnp.int32)  # first row ending at or after s
    slot_row = jnp.where((row < B) & (s >= row_slot[jnp.minimum(row, B - 1), 0]), row, B).astype(jnp.int32)
    return DecodePlan(part_chunk, jnp.stack([first_row, last_row], axis=1), row_chunk, row_slot, slot_row)


def combine(o, m, l, plan: DecodePlan, dtype):
    """Merges each row's partial results by log-sum-exp.

    o f32[S, H, R] unnormalised contexts, m f32[S, H] running max (log2 units), l f32[S, H] sums
    -> [B, H, R] dtype. Slots no segment wrote (and garbage in them) weigh nothing.
    """
    B = plan.row_slot.shape[0]
    row = plan.slot_row  # [S]: segment B collects the unused slots and is dropped
    used = row < B
    m = jnp.where(used[:, None], m, -jnp.inf)
    m_row = jax.ops.segment_max(m, row, num_segments=B + 1, indices_are_sorted=True)[:B]  # [B, H]
    w = jnp.where(used[:, None], jnp.exp2(m - m_row[jnp.minimum(row, B - 1)]), 0.0)  # [S, H]
    num = jax.ops.segment_sum(jnp.where(used[:, None, None], w[..., None] * o, 0.0), row, num_segments=B + 1,
                              indices_are_sorted=True)[:B]
    den = jax.ops.segment_sum(w * jnp.where(used[:, None], l, 0.0), row, num_segments=B + 1,
                              indices_are_sorted=True)[:B]
    return (num / den[..., None]).astype(dtype)


def _kernel(part_chunk_ref, part_rows_ref, row_chunk_ref, lengths_ref, table_ref, q_ref, pool_ref,
            o_ref, m_ref, l_ref,
            q_smem, kv_smem, stats, q_bar, kv_bar, kv_free, q_free, scale0, scale1, p0_ready, p1_ready,
            *, scale_log2: float, rank: int, block_size: int, interpret: bool):
    hb, part, wg = lax.axis_index("hb"), lax.axis_index("part"), lax.axis_index("wg")
    g0, g1 = part_chunk_ref[part], part_chunk_ref[part + 1]
    r0, r1 = part_rows_ref[part, 0], part_rows_ref[part, 1]
    half = rank // 2
    heads = pl.ds(hb * HEADS, HEADS)
    # Refs inside a wgmma's run_state are indexed with traced values (static indices there do not lower):
    # warpgroup w scores stage w, so `wg` and `1 - wg` name the stages and the column offsets derive from it.
    zero = wg - wg
    p_cols = pl.ds(pl.multiple_of(zero + rank, CHUNK), CHUNK)  # a stage's rope columns, free after its scores: a P

    def chunk_range(b):  # this part's chunks of row b, as chunk indices within the row
        base = row_chunk_ref[b]
        return jnp.maximum(g0, base) - base, jnp.minimum(g1, row_chunk_ref[b + 1]) - base

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")

        def load(b, c, buf):
            used = (lengths_ref[b] + block_size - 1) // block_size  # pages holding valid positions
            if block_size >= CHUNK:  # one page holds this chunk
                start = c * CHUNK
                page = table_ref[b, start // block_size]
                plgpu.copy_gmem_to_smem(pool_ref.at[page, pl.ds(lax.rem(start, block_size), CHUNK)],
                                        kv_smem.at[buf], kv_bar.at[buf])
            else:  # CHUNK // block_size pages; ones past the row's last page re-read its first (masked)
                for i in range(CHUNK // block_size):
                    idx = c * (CHUNK // block_size) + i
                    page = table_ref[b, jnp.where(idx < used, idx, 0)]
                    plgpu.copy_gmem_to_smem(pool_ref.at[page], kv_smem.at[buf, pl.ds(i * block_size, block_size)],
                                            kv_bar.at[buf])

        def row(b, uses):  # uses: chunks loaded into stage 0 and stage 1 so far
            @pl.when(b > r0)
            def _():
                plgpu.barrier_wait(q_free)  # both consumers are done with the previous row's scores
            plgpu.copy_gmem_to_smem(q_ref.at[b, heads], q_smem.at[0], q_bar)
            c0, c1 = chunk_range(b)

            def chunk(c, uses):
                buf = lax.rem(c - c0, 2)  # a row's even chunks go to stage 0, odd ones to stage 1

                @pl.when(jnp.where(buf == 0, uses[0], uses[1]) > 0)
                def _():
                    plgpu.barrier_wait(kv_free.at[buf])  # both consumers are done with its previous chunk
                load(b, c, buf)
                return uses[0] + (buf == 0), uses[1] + (buf == 1)
            return lax.fori_loop(c0, c1, chunk, uses)

        u0, u1 = lax.fori_loop(r0, r1 + 1, row, (jnp.int32(0), jnp.int32(0)))

        # observe the last releases too (a barrier phase nobody awaits is an error in interpret mode)
        @pl.when(u0 > 0)
        def _():
            plgpu.barrier_wait(kv_free.at[0])

        @pl.when(u1 > 0)
        def _():
            plgpu.barrier_wait(kv_free.at[1])

        @pl.when(r1 >= r0)
        def _():
            plgpu.barrier_wait(q_free)

    row_vec = lambda v: plgpu.layout_cast(jnp.full((HEADS,), v, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    bcast = lambda v, like: lax.broadcast_in_dim(v, like.shape, [0])
    load_vec = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1))

    def scores(b, c, buf, z):
        """Q . chunk^T of the chunk in stage buf, masked past the row's length, in log2 units: [64, 64] f32."""
        s = mma(q_smem.at[z], kv_smem.at[buf].T, (HEADS, CHUNK))
        pos = c * CHUNK + plgpu.broadcasted_iota(jnp.int32, (HEADS, CHUNK), 1, layout=plgpu.Layout.WGMMA)
        return jnp.where(pos < lengths_ref[b], s * scale_log2, -jnp.inf)  # each chunk has a valid position

    def rows_of_this_part(pair_fn, epilogue):
        """Runs pair_fn(b, c, has1, last, z, carry) -> carry over each row's chunk pairs (c, c + 1), then epilogue;
        has1 says whether the pair has its second chunk (a row's odd chunk count leaves the last pair one
        chunk). z is 0, but not to the compiler: shared-memory operands indexed by it get their wgmma
        descriptors computed where used, not hoisted out of the loop (the scores' would hold 72 registers)."""
        def row(b, _):
            c0, c1 = chunk_range(b)
            npairs = (c1 - c0 + 1) // 2
            plgpu.barrier_wait(q_bar)
            init = (plgpu.layout_cast(jnp.zeros((HEADS, half), jnp.float32), plgpu.Layout.WGMMA), row_vec(0.0),
                    row_vec(-jnp.inf))

            def pair(i, carry):
                c = c0 + 2 * i
                return pair_fn(b, c, c + 1 < c1, i == npairs - 1, lax.shift_right_logical(i, 30), carry)
            epilogue(b, lax.fori_loop(0, npairs, pair, init))
            return None
        lax.fori_loop(r0, r1 + 1, row, None)

    # FlashMLA's schedule: warpgroup w scores the chunks in stage w (the row's even chunks for 0, odd for 1)
    # and accumulates columns [w * R/2, (w + 1) * R/2) of the context for every chunk; each hands the other
    # its probabilities (bf16, rescaled to the pair's common max) through the rope columns of its stage, which
    # its own scores no longer need. Inside a pair: warpgroup 0 publishes its max m0 (scale0); warpgroup 1
    # takes the pair's max m1 >= m0 and publishes it with exp2(m0 - m1) (scale1); each rescales its context
    # and sum to m1 and multiplies P by the two chunks' latents while the other works.
    @pl.when(wg == 0)
    def _consumer0():
        plgpu.set_max_registers(CONSUMER_REGS, action="increase")
        cols = pl.ds(pl.multiple_of(zero, half), half)

        def pair(b, c, has1, last, z, carry):
            own, other = zero + z, zero + z + 1  # stages
            acc, l, m = carry  # [64, R/2] f32 context; [64] sum and max (log2 units), both as of the last pair
            plgpu.barrier_wait(kv_bar.at[0])
            s = scores(b, c, own, z)
            plgpu.barrier_arrive(q_free, predicate=last)
            m0 = jnp.maximum(m, s.max(axis=1))
            a0 = jnp.exp2(m - m0)
            p = jnp.exp2(s - bcast(m0, s))
            l = l * a0 + p.sum(axis=1)
            stats[0] = m0
            stats[1] = a0
            plgpu.barrier_arrive(scale0)

            def own_chunk(mma):  # P0 . the chunk's latent half, and P0 rescaled to m1 for warpgroup 1 meanwhile
                mma(p.astype(kv_smem.dtype), kv_smem.at[own, :, cols])
                plgpu.barrier_wait(scale1)
                a1 = load_vec(stats.at[z + 3])  # exp2(m0 - m1)
                kv_smem[own, :, p_cols] = (p * bcast(a1, p)).astype(kv_smem.dtype)
                plgpu.commit_smem()  # visible to warpgroup 1's wgmma (async proxy)
                plgpu.barrier_arrive(p0_ready)
            acc = mma_chain(acc * bcast(a0, acc), own_chunk, interpret)
            plgpu.barrier_arrive(kv_free.at[0])
            m1, a1 = load_vec(stats.at[2]), load_vec(stats.at[3])

            def other_chunk(acc):  # warpgroup 1's P . this half of its chunk's latent
                def product(mma):
                    plgpu.barrier_wait(p1_ready)
                    mma(kv_smem.at[other, :, p_cols], kv_smem.at[other, :, cols])
                acc = mma_chain(acc, product, interpret)
                plgpu.barrier_arrive(kv_free.at[1])
                return acc
            acc = lax.cond(has1, other_chunk, lambda acc: acc, acc * bcast(a1, acc))
            return acc, l * a1, m1

        def epilogue(b, carry):
            acc, l, _ = carry
            o_ref[part + b, heads, cols] = acc
            l_ref[part + b, 0, heads] = l

        rows_of_this_part(pair, epilogue)

    @pl.when(wg == 1)
    def _consumer1():
        plgpu.set_max_registers(CONSUMER_REGS, action="increase")
        cols = pl.ds(pl.multiple_of(zero + half, half), half)

        def pair(b, c, has1, last, z, carry):
            own, other = zero + z + 1, zero + z  # stages
            acc, l, _ = carry

            def own_scores():
                plgpu.barrier_wait(kv_bar.at[1])
                return scores(b, c + 1, own, z)
            none = lambda: plgpu.layout_cast(jnp.full((HEADS, CHUNK), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA)
            s = lax.cond(has1, own_scores, none)  # no second chunk: P = 0, m1 = m0
            plgpu.barrier_arrive(q_free, predicate=last)
            plgpu.barrier_wait(scale0)
            m0, a0 = load_vec(stats.at[0]), load_vec(stats.at[1])
            m1 = jnp.maximum(m0, s.max(axis=1))
            a1 = jnp.exp2(m0 - m1)
            p = jnp.exp2(s - bcast(m1, s))
            l = l * (a0 * a1) + p.sum(axis=1)
            stats[2] = m1
            stats[3] = a1
            plgpu.barrier_arrive(scale1)

            def other_chunk(mma):  # warpgroup 0's P . this half of its chunk's latent
                plgpu.barrier_wait(p0_ready)
                mma(kv_smem.at[other, :, p_cols], kv_smem.at[other, :, cols])

            def both_chunks(acc):  # P1 . its chunk's latent half, then P0 . the other chunk's, back to back
                p16 = p.astype(kv_smem.dtype)
                kv_smem[own, :, p_cols] = p16
                plgpu.commit_smem()
                plgpu.barrier_arrive(p1_ready)

                def products(mma):
                    mma(p16, kv_smem.at[own, :, cols])
                    other_chunk(mma)
                acc = mma_chain(acc, products, interpret)
                plgpu.barrier_arrive(kv_free.at[1])
                return acc
            acc = lax.cond(has1, both_chunks, lambda acc: mma_chain(acc, other_chunk, interpret),
                           acc * bcast(a0 * a1, acc))
            plgpu.barrier_arrive(kv_free.at[0])
            return acc, l, m1

        def epilogue(b, carry):
            acc, l, m = carry
            o_ref[part + b, heads, cols] = acc
            l_ref[part + b, 1, heads] = l
            m_ref[part + b, heads] = m

        rows_of_this_part(pair, epilogue)


def flash_mla_decode(q_latent, q_pe, pool, page_table, lengths, scale: float, plan: DecodePlan, *,
                     interpret: bool = False):
    """One layer's absorbed MLA decode over the paged pool -> context [B, H, R] in q_latent's dtype.

    Arguments as model/kernels/mla_decode.py's mla_decode (pool [NB, BS, C] with BS a multiple of 16 that
    divides 64 or is a multiple of 64; positions past a row's length must hold finite values, as the
    engine's zero-initialised pool does), plus the step's plan (plan_decode(lengths, num_parts)).
    interpret: run the kernel in Mosaic GPU interpret mode (CPU).
    """
    _check(q_latent, q_pe, pool, page_table, lengths, plan)
    _, H, R = q_latent.shape
    Hp = -(-H // HEADS) * HEADS  # padded heads: zero queries, sliced off below
    q = jnp.concatenate([q_latent, q_pe], axis=-1).astype(pool.dtype)
    q = jnp.pad(q, ((0, 0), (0, Hp - H), (0, 0)))
    o, m, l = _partials(q, pool, page_table, lengths, plan, float(scale), R, interpret)
    return combine(o, m, l, plan, q_latent.dtype)[:, :H]


def _check(q_latent, q_pe, pool, page_table, lengths, plan):
    """The shared decode checks (one sentence each), then this kernel's own tile constraints."""
    from model.kernels.mla_decode import _check as check_decode
    check_decode(q_latent, q_pe, pool, page_table, lengths, pool.shape[1], "xla")
    (B, _, R), (_, BS, C) = q_latent.shape, pool.shape
    if pool.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the flash MLA kernel reads a bfloat16 or float16 cache (wgmma operands), got {pool.dtype}.")
    if R % 128 or R > 512 or (C - R) % 64 or C == R:
        raise ValueError(f"the flash MLA kernel needs kv_lora_rank a multiple of 128 up to 512 and a rope width that "
                         f"is a nonzero multiple of 64, got {R} and {C - R}.")
    if BS % 16 or (BS < CHUNK and CHUNK % BS) or (BS > CHUNK and BS % CHUNK):
        raise ValueError(f"the flash MLA kernel needs pages of 16, 32 or a multiple of 64 tokens, got {BS}.")
    if plan.row_chunk.shape != (B + 1,):
        raise ValueError(f"the decode plan was made for {plan.row_chunk.shape[0] - 1} rows, not {B}.")


@functools.partial(jax.jit, static_argnames=("scale", "rank", "interpret"))
def _partials(q, pool, page_table, lengths, plan: DecodePlan, scale: float, rank: int, interpret: bool):
    """q [B, Hp, C] (Hp a multiple of 64) -> o f32[S, Hp, R], m f32[S, Hp], l f32[S, Hp]."""
    (_, Hp, C), BS, R = q.shape, pool.shape[1], rank
    S, N = plan.num_slots, plan.num_parts
    kernel = plgpu.kernel(
        functools.partial(_kernel, scale_log2=scale * LOG2E, rank=R, block_size=BS, interpret=interpret),
        out_type=(jax.ShapeDtypeStruct((S, Hp, R), jnp.float32), jax.ShapeDtypeStruct((S, Hp), jnp.float32),
                  jax.ShapeDtypeStruct((S, 2, Hp), jnp.float32)),  # l: each warpgroup's sum over its chunks
        scratch_types=(
            tiled_smem((1, HEADS, C), pool.dtype),  # q_smem
            tiled_smem((2, CHUNK, C), pool.dtype),  # kv_smem: two stages, each one chunk (and later a P)
            plgpu.SMEM((4, HEADS), jnp.float32),  # stats: m0, a0 (warpgroup 0's), m1, a1 (warpgroup 1's)
            plgpu.Barrier(num_barriers=1),  # q_bar
            plgpu.Barrier(num_arrivals=max(1, CHUNK // BS), num_barriers=2),  # kv_bar: one arrival per copy
            plgpu.Barrier(num_arrivals=2, num_barriers=2),  # kv_free: both consumers
            plgpu.Barrier(num_arrivals=2, num_barriers=1),  # q_free: both consumers
            plgpu.Barrier(num_barriers=1),  # scale0: m0, a0 written
            plgpu.Barrier(num_barriers=1),  # scale1: m1, a1 written
            plgpu.Barrier(num_barriers=1),  # p0_ready
            plgpu.Barrier(num_barriers=1),  # p1_ready
        ),
        grid=(Hp // HEADS, N),  # head blocks fastest: both head blocks of a part read its pages together (L2)
        grid_names=("hb", "part"),
        num_threads=3,
        thread_name="wg",
        # the row reductions of the wgmma layout are warp shuffles: no shared-memory scratch
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=interpret_params(interpret),
        kernel_name="flash_mla_decode",
    )
    o, m, l = kernel(plan.part_chunk, plan.part_rows, plan.row_chunk, lengths, page_table, q, pool)
    return o, m, l.sum(axis=1)
