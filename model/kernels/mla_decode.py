"""MLA decode attention over the paged latent KV cache (weight-absorbed form), as a Pallas kernel.

Axis legend (as in model/attention.py and serving/kv_cache.py): B batch rows, H heads, R kv_lora_rank,
P qk_rope_head_dim, C = R + P cache width, NB blocks in the pool slice, BS tokens per block, MB blocks
per row (page table width), G heads per program (block_h), S KV splits.

Decode has one new query per row, so attention is a memory-bound scan of the row's cached pages:
each [BS, C] page is read once per head group and used twice, for the scores (q_latent . latent +
q_pe . k_pe) and for the context (probs . latent). The kernel is flash-decoding: a grid over
(row, head group, KV split); each program walks its share of the row's page table with an online
softmax (running max m, running sum l, f32 context accumulator), and the S partial results are merged
afterwards with their (m, l). Computing it in latent space (w_k folded into q, w_v applied after) means
the cache is never expanded to per-head keys and values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

NUM_WARPS, NUM_STAGES = 8, 2  # Triton launch parameters; a [64, 512] bf16 page is 64 KiB of registers/smem


def mla_decode(q_latent, q_pe, pool, page_table, lengths, scale: float, *, block_size: int, impl: str = "xla",
               interpret: bool = False, block_h: int = 16, num_splits: int | None = None):
    """One decode step of absorbed MLA for ONE layer -> context [B, H, R] in q's dtype (before w_v).

    q_latent [B, H, R]: q_nope @ w_k per head (MLA.attend_absorbed's q_latent); q_pe [B, H, P]: roped.
    pool [NB, BS, C]: one layer's slice of PagedCache.pool (pool[layer], or one dp rank's blocks of it),
      each position's normalised latent then its roped shared key.
    page_table int32[B, MB]: local block ids, position order; entries past a row's length are ignored.
    lengths int32[B]: valid cached positions per row (>= 1; the new token's row already written).
    scale: the softmax scale, a Python float (ModelConfig.softmax_scale, YaRN mscale included).
    block_size: tokens per block; must equal pool.shape[1] (stated by the caller so a mismatched
      pool layout fails loudly instead of reading the wrong positions).
    impl: "pallas" (the kernel) or "xla" (gather + einsums reference); a deployment picks one by name
      (model/kernels/registry.py), never by the backend at trace time.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    block_h: heads per program (G); Triton's dot needs >= 16, so H is padded up to a multiple of it.
    num_splits: KV splits per row (S); None picks enough to fill a GPU at small batch.
    Softmax and accumulation are f32; probabilities meet the latent in its dtype, as in attend_absorbed.
    """
    B, H, R, P, NB, BS, MB = _check(q_latent, q_pe, pool, page_table, lengths, block_size, impl)
    if impl == "xla":
        return _xla(q_latent, q_pe, pool, page_table, lengths, float(scale))
    if not interpret:  # Triton tensors are power-of-two sized and tl.dot wants every side >= 16
        for name, n in (("kv_lora_rank", R), ("rope dim", P), ("block_size", BS), ("block_h", block_h)):
            if n < 16 or n & (n - 1):
                raise ValueError(f"the compiled Pallas kernel needs {name} a power of two >= 16, got {n}.")
    if num_splits is None:  # ~256 programs fill an H100 (132 SMs); keep >= 4 pages per split
        num_splits = max(1, min(-(-256 // (B * -(-H // block_h))), -(-MB // 4)))
    return _pallas(q_latent, q_pe, pool, page_table, lengths, float(scale), block_h, min(num_splits, MB), interpret)


def _check(q_latent, q_pe, pool, page_table, lengths, block_size, impl):
    if impl not in ("pallas", "xla"):
        raise ValueError(f"impl must be 'pallas' or 'xla', got {impl!r}.")
    if q_latent.ndim != 3 or q_pe.ndim != 3 or pool.ndim != 3 or page_table.ndim != 2 or lengths.ndim != 1:
        raise ValueError(f"expected q_latent [B, H, R], q_pe [B, H, P], pool [NB, BS, C], page_table [B, MB] and "
                         f"lengths [B], got shapes {q_latent.shape}, {q_pe.shape}, {pool.shape}, "
                         f"{page_table.shape}, {lengths.shape}.")
    (B, H, R), (NB, BS, C), MB = q_latent.shape, pool.shape, page_table.shape[1]
    if q_pe.shape[:2] != (B, H):
        raise ValueError(f"q_latent and q_pe disagree on [batch, heads]: {q_latent.shape[:2]} vs {q_pe.shape[:2]}.")
    if q_latent.dtype != q_pe.dtype:
        raise ValueError(f"q_latent and q_pe must share a dtype, got {q_latent.dtype} and {q_pe.dtype}.")
    if R + q_pe.shape[2] != C:
        raise ValueError(f"pool width {C} is not kv_lora_rank {R} + rope dim {q_pe.shape[2]}.")
    if block_size != BS:
        raise ValueError(f"block_size={block_size} but the pool's blocks hold {BS} positions (pool shape {pool.shape}).")
    if page_table.shape[0] != B or lengths.shape != (B,):
        raise ValueError(f"page_table {page_table.shape} and lengths {lengths.shape} must have {B} rows like q.")
    if page_table.dtype != jnp.int32 or lengths.dtype != jnp.int32:
        raise ValueError(f"page_table and lengths must be int32, got {page_table.dtype} and {lengths.dtype}.")
    if MB > NB:
        raise ValueError(f"the page table has {MB} blocks per row but the pool holds only {NB} blocks.")
    if not isinstance(lengths, jax.core.Tracer):  # values are checkable only outside jit
        lo, hi = int(np.min(lengths)), int(np.max(lengths))
        if lo < 1 or hi > MB * BS:
            raise ValueError(f"lengths must lie in [1, {MB * BS}] ({MB} blocks of {BS}), got [{lo}, {hi}].")
    return B, H, R, q_pe.shape[2], NB, BS, MB


@functools.partial(jax.jit, static_argnames=("scale",))
def _xla(q_latent, q_pe, pool, page_table, lengths, scale):
    """Reference: gather each row's pages (PagedCache.read), then attend_absorbed's einsums."""
    (B, MB), (_, BS, C), R = page_table.shape, pool.shape, q_latent.shape[-1]
    pos = jnp.arange(MB * BS)
    used = jnp.arange(MB)[None] * BS < lengths[:, None]  # [B, MB] blocks holding a valid position
    rows = pool[jnp.where(used, page_table, 0)].reshape(B, MB * BS, C)  # junk ids never index the pool
    valid = pos[None] < lengths[:, None]  # [B, T]
    rows = jnp.where(valid[..., None], rows, 0).astype(q_latent.dtype)  # stale/NaN rows must give 0 * 0, not 0 * NaN
    latent, k_pe = rows[..., :R], rows[..., R:]
    scores = (jnp.einsum("bhr,btr->bht", q_latent, latent, preferred_element_type=jnp.float32)
              + jnp.einsum("bhp,btp->bht", q_pe, k_pe, preferred_element_type=jnp.float32))
    probs = jax.nn.softmax(jnp.where(valid[:, None], scores * scale, -jnp.inf), axis=-1)
    context = jnp.einsum("bht,btr->bhr", probs.astype(latent.dtype), latent, preferred_element_type=jnp.float32)
    return context.astype(q_latent.dtype)


def _kernel(table_ref, length_ref, q_ref, qpe_ref, pool_ref, o_ref, m_ref, l_ref, *, scale, pages_per_split):
    # table_ref int32[pages_per_split]: this split's slice of the row's page table; length_ref int32[1]
    # q_ref [G, R], qpe_ref [G, P], pool_ref [NB, BS, C] (whole pool: pages are picked by id, not by grid)
    # o_ref [G, R] (context / l of this split), m_ref / l_ref f32[G] (its running max and sum)
    (G, R), P, BS = q_ref.shape, qpe_ref.shape[1], pool_ref.shape[1]
    first = pl.program_id(2) * pages_per_split  # global index of this split's first page
    length = length_ref[0]
    n_pages = jnp.clip(pl.cdiv(length, BS) - first, 0, pages_per_split)  # pages holding valid positions
    q, q_pe = q_ref[...], qpe_ref[...]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None  # no TF32 for f32 inputs

    def page(j, carry):
        acc, m, l = carry  # [G, R] f32, [G] f32, [G] f32
        block = table_ref[j]
        latent = pool_ref[block, :, pl.ds(0, R)].astype(q.dtype)  # [BS, R]; loaded once, used twice
        k_pe = pool_ref[block, :, pl.ds(R, P)].astype(q.dtype)  # [BS, P]
        valid = (first + j) * BS + lax.broadcasted_iota(jnp.int32, (BS,), 0) < length  # [BS]
        latent = jnp.where(valid[:, None], latent, 0)  # positions past length may hold stale data or NaN
        s = (pltriton.dot(q, latent, trans_b=True, precision=precision)
             + pltriton.dot(q_pe, k_pe, trans_b=True, precision=precision))  # [G, BS] f32
        s = jnp.where(valid[None, :], s * scale, -jnp.inf)  # every visited page has >= 1 valid position
        m_new = jnp.maximum(m, s.max(axis=1))  # finite after the first page
        correction = jnp.exp(m - m_new)  # rescales what was summed under the old max (exp(-inf) = 0)
        p = jnp.exp(s - m_new[:, None])  # [G, BS]
        l = correction * l + p.sum(axis=1)
        acc = correction[:, None] * acc + pltriton.dot(p.astype(latent.dtype), latent, precision=precision)
        return acc, m_new, l

    init = (jnp.zeros((G, R), jnp.float32), jnp.full((G,), -jnp.inf, jnp.float32), jnp.zeros((G,), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_pages, page, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)  # an empty split stays 0
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "block_h", "num_splits", "interpret"))
def _pallas(q_latent, q_pe, pool, page_table, lengths, scale, block_h, num_splits, interpret):
    (B, H, R), P, MB = q_latent.shape, q_pe.shape[-1], page_table.shape[1]
    Hp = -(-H // block_h) * block_h  # padded heads: zero queries, sliced off below
    q_latent = jnp.pad(q_latent, ((0, 0), (0, Hp - H), (0, 0)))
    q_pe = jnp.pad(q_pe, ((0, 0), (0, Hp - H), (0, 0)))
    pps = -(-MB // num_splits)  # pages per split; the table is padded with block 0 (never visited)
    page_table = jnp.pad(page_table, ((0, 0), (0, pps * num_splits - MB)))
    S, part_dtype = num_splits, (q_latent.dtype if num_splits == 1 else jnp.float32)
    grid = (B, Hp // block_h, S)
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, scale=scale, pages_per_split=pps),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, pps), lambda b, g, s: (b, s)),  # page table slice
            pl.BlockSpec((1,), lambda b, g, s: (b,)),  # length
            pl.BlockSpec((None, block_h, R), lambda b, g, s: (b, g, 0)),  # q_latent
            pl.BlockSpec((None, block_h, P), lambda b, g, s: (b, g, 0)),  # q_pe
            pl.BlockSpec(pool.shape, lambda b, g, s: (0, 0, 0)),  # pool: whole, indexed by page id
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_h, R), lambda b, g, s: (s, b, g, 0)),
            pl.BlockSpec((None, None, block_h), lambda b, g, s: (s, b, g)),
            pl.BlockSpec((None, None, block_h), lambda b, g, s: (s, b, g)),
        ],
        out_shape=[jax.ShapeDtypeStruct((S, B, Hp, R), part_dtype),
                   jax.ShapeDtypeStruct((S, B, Hp), jnp.float32),
                   jax.ShapeDtypeStruct((S, B, Hp), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name=f"mla_decode_G{block_h}_S{S}",
    )(page_table, lengths, q_latent, q_pe, pool)
    if S == 1:
        return o[0, :, :H]
    # merge splits: each holds softmax(s_split) . latent; reweight by its share l * exp(m - m_max)
    w = l * jnp.exp(m - m.max(axis=0))  # [S, B, Hp]; empty splits (m = -inf) weigh 0; split 0 is never empty
    context = (w[..., None] * o).sum(axis=0) / w.sum(axis=0)[..., None]
    return context[:, :H].astype(q_latent.dtype)
