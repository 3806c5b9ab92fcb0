"""Paged MLA decode (weight-absorbed form) as a Mosaic GPU kernel, FlashMLA's structure in Pallas.

Axis legend (as in model/kernels/mla_decode.py): B batch rows, H heads, R kv_lora_rank, P rope dim,
C = R + P cache width, NB blocks in the pool, BS tokens per block, MB blocks per row (page table width),
N parts of the KV split (CTAs per head block), S partial slots (N + B - 1).

Why this shape (docs/KERNELS.md has the numbers): absorbed decode with 128 heads is compute-bound on
Hopper, so each page must feed as many heads as one CTA can hold. A CTA takes 64 heads (one warpgroup's
wgmma M) and streams its share of KV in 64-token chunks through shared memory (TMA, two stages, one
producer warpgroup). Per chunk, warpgroup 0 computes the scores Q[64, C] . chunk[64, C]^T and the
online softmax, and hands the probabilities P (bf16) and the rescale factor to warpgroup 1 through
shared memory; each of the two warpgroups then accumulates half of the [64, R] f32 context
(P . chunk[:, half]): a [64, 512] f32 accumulator does not fit one warpgroup's registers. The chunk
feeds both products from shared memory, so each page is read once per 64-head block.

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

from model.kernels.mosaic import (CONSUMER_REGS, PRODUCER_REGS, interpret_params, mma, mma_into,
                                  tiled_smem)

CHUNK = 64  # tokens per pipeline stage: the scores' wgmma N and the context's wgmma K
HEADS = 64  # heads per CTA: one warpgroup's wgmma M
STAGES = 2  # shared-memory KV stages (Q 72 KiB + 2 x 72 KiB + P 8 KiB fits Hopper's 227 KiB at C = 576)
ROW_OVERHEAD = 2  # a row segment's fixed cost in chunks (Q load, epilogue, one more partial to combine)
LOG2E = math.log2(math.e)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The KV split of one decode step, shared by every layer (all int32, on device).

    Chunks are numbered through the concatenation of the rows: row b holds global chunks
    [row_chunk[b], row_chunk[b + 1]). Part p takes global chunks [part_chunk[p], part_chunk[p + 1]),
    which lie in rows part_rows[p, 0] .. part_rows[p, 1] (an empty part has part_rows[p, 1] < [p, 0]).
    Row b's partial results are in slots [row_slot[b, 0], row_slot[b, 1]] (inclusive).
    """
    part_chunk: jax.Array  # [N + 1]
    part_rows: jax.Array  # [N, 2]
    row_chunk: jax.Array  # [B + 1]
    row_slot: jax.Array  # [B, 2]

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
    return DecodePlan(part_chunk, jnp.stack([first_row, last_row], axis=1), row_chunk, row_slot)


def combine(o, m, l, plan: DecodePlan, dtype):
    """Merges each row's partial results by log-sum-exp.

    o f32[S, H, R] unnormalised contexts, m f32[S, H] running max (log2 units), l f32[S, H] sums
    -> [B, H, R] dtype. Slots no segment wrote (and garbage in them) weigh nothing.
    """
    S, B = o.shape[0], plan.row_slot.shape[0]
    s = jnp.arange(S, dtype=jnp.int32)
    row = jnp.searchsorted(plan.row_slot[:, 1], s, side="left").astype(jnp.int32)  # first row ending at or after s
    used = (row < B) & (s >= plan.row_slot[jnp.minimum(row, B - 1), 0])
    row = jnp.where(used, row, B)  # segment B collects the unused slots and is dropped
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
            q_smem, kv_smem, p_smem, alpha_smem, q_bar, kv_bar, kv_free, p_ready, p_free,
            *, scale_log2: float, rank: int, block_size: int, interpret: bool):
    hb, part, wg = lax.axis_index("hb"), lax.axis_index("part"), lax.axis_index("wg")
    g0, g1 = part_chunk_ref[part], part_chunk_ref[part + 1]
    r0, r1 = part_rows_ref[part, 0], part_rows_ref[part, 1]
    half = rank // 2
    heads = pl.ds(hb * HEADS, HEADS)

    def chunk_range(b):  # this part's chunks of row b, as chunk indices within the row
        base = row_chunk_ref[b]
        return jnp.maximum(g0, base) - base, jnp.minimum(g1, row_chunk_ref[b + 1]) - base

    def for_each_chunk(fn, init):
        """fn(b, c, t, carry) -> carry over this part's chunks in order; t counts chunks (ring position).
        Also calls fn.row_start(b, carry) / fn.row_end(b, carry) around each row segment."""
        def row_body(b, state):
            t, carry = state
            c0, c1 = chunk_range(b)
            carry = fn.row_start(b, carry)
            t, carry = lax.fori_loop(c0, c1, lambda c, s: (s[0] + 1, fn(b, c, s[0], s[1])), (t, carry))
            return t, fn.row_end(b, carry)
        return lax.fori_loop(r0, r1 + 1, row_body, (jnp.int32(0), init))

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")

        def load(b, c, t, carry):
            slot = lax.rem(t, STAGES)

            @pl.when(t >= STAGES)
            def _():
                plgpu.barrier_wait(kv_free.at[slot])  # both consumers are done with this stage

            used = (lengths_ref[b] + block_size - 1) // block_size  # pages holding valid positions
            if block_size >= CHUNK:  # one page holds this chunk
                start = c * CHUNK
                page = table_ref[b, start // block_size]
                plgpu.copy_gmem_to_smem(pool_ref.at[page, pl.ds(lax.rem(start, block_size), CHUNK)],
                                        kv_smem.at[slot], kv_bar.at[slot])
            else:  # CHUNK // block_size pages; ones past the row's last page re-read its first (masked)
                for i in range(CHUNK // block_size):
                    idx = c * (CHUNK // block_size) + i
                    page = table_ref[b, jnp.where(idx < used, idx, 0)]
                    plgpu.copy_gmem_to_smem(pool_ref.at[page], kv_smem.at[slot, pl.ds(i * block_size, block_size)],
                                            kv_bar.at[slot])
            return carry

        load.row_start = load.row_end = lambda b, carry: carry
        for_each_chunk(load, None)

    @pl.when(wg < 2)
    def _consumers():
        plgpu.set_max_registers(CONSUMER_REGS, action="increase")
        cols = pl.ds(wg * half, half)  # this warpgroup's half of the context
        zeros_acc = plgpu.layout_cast(jnp.zeros((HEADS, half), jnp.float32), plgpu.Layout.WGMMA)
        row_vec = lambda v: plgpu.layout_cast(jnp.full((HEADS,), v, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

        def start(b, carry):
            @pl.when(wg == 0)
            def _():  # the scores warpgroup loads this row's queries (only it reads them)
                plgpu.copy_gmem_to_smem(q_ref.at[b, heads], q_smem, q_bar.at[0])
                plgpu.barrier_wait(q_bar.at[0])
            return zeros_acc, row_vec(-jnp.inf), row_vec(0.0)

        def step(b, c, t, carry):
            acc, m, l = carry  # [64, R/2] f32; [64] f32 (log2 units); [64] f32
            slot = lax.rem(t, STAGES)
            plgpu.barrier_wait(kv_bar.at[slot])

            def scores_and_softmax(m, l):
                s = mma(q_smem, kv_smem.at[slot].T, (HEADS, CHUNK))  # [64 heads, 64 tokens] f32
                pos = c * CHUNK + plgpu.broadcasted_iota(jnp.int32, (HEADS, CHUNK), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(pos < lengths_ref[b], s * scale_log2, -jnp.inf)  # each chunk has a valid position
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)

                @pl.when(t > 0)
                def _():
                    plgpu.barrier_wait(p_free.at[0])  # warpgroup 1 has read the previous P
                p_smem[...] = p.astype(p_smem.dtype)
                alpha_smem[...] = alpha
                plgpu.commit_smem()
                plgpu.barrier_arrive(p_ready.at[0])
                return alpha, m_new, l

            def receive(m, l):
                plgpu.barrier_wait(p_ready.at[0])
                return plgpu.load(alpha_smem, layout=plgpu.Layout.WGMMA.reduce(1)), m, l

            alpha, m, l = lax.cond(wg == 0, scores_and_softmax, receive, m, l)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            acc = mma_into(acc, p_smem, kv_smem.at[slot, :, cols], interpret)  # P and the stage are free after

            # arrivals nobody will wait for are skipped: the last P, the last STAGES stages
            @pl.when((wg == 1) & (t + 1 < g1 - g0))
            def _():
                plgpu.barrier_arrive(p_free.at[0])

            @pl.when(t + STAGES < g1 - g0)
            def _():
                plgpu.barrier_arrive(kv_free.at[slot])
            return acc, m, l

        def end(b, carry):
            acc, m, l = carry
            slot = part + b
            o_ref[slot, heads, cols] = acc

            @pl.when(wg == 0)
            def _():
                m_ref[slot, heads] = m
                l_ref[slot, heads] = l
            return carry

        step.row_start, step.row_end = start, end
        for_each_chunk(step, (zeros_acc, row_vec(-jnp.inf), row_vec(0.0)))


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
    if R % 128 or R > 512 or (C - R) % 64:
        raise ValueError(f"the flash MLA kernel needs kv_lora_rank a multiple of 128 up to 512 and a rope width that "
                         f"is a multiple of 64, got {R} and {C - R}.")
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
                  jax.ShapeDtypeStruct((S, Hp), jnp.float32)),
        scratch_types=(
            tiled_smem((HEADS, C), pool.dtype),  # q_smem
            tiled_smem((STAGES, CHUNK, C), pool.dtype),  # kv_smem
            tiled_smem((HEADS, CHUNK), pool.dtype),  # p_smem
            plgpu.SMEM((HEADS,), jnp.float32),  # alpha_smem
            plgpu.Barrier(num_barriers=1),  # q_bar
            plgpu.Barrier(num_arrivals=max(1, CHUNK // BS), num_barriers=STAGES),  # kv_bar: one arrival per copy
            plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),  # kv_free: both consumers
            plgpu.Barrier(num_barriers=1),  # p_ready
            plgpu.Barrier(num_barriers=1),  # p_free
        ),
        grid=(Hp // HEADS, N),  # head blocks fastest: both head blocks of a part read its pages together (L2)
        grid_names=("hb", "part"),
        num_threads=3,
        thread_name="wg",
        # the row reductions of the wgmma layout are warp shuffles: no shared-memory scratch (the 2 KiB
        # reserved by default would not fit beside the stages at C = 576)
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=interpret_params(interpret),
        kernel_name="flash_mla_decode",
    )
    return kernel(plan.part_chunk, plan.part_rows, plan.row_chunk, lengths, page_table, q, pool)
