"""Routed experts: their stacked weights, and the one grouped SwiGLU FFN every path runs.

Axis legend: M rows (tokens on one device, or rows it received), k expert choices per row, El
expert slots here, D hidden, F expert intermediate, G groups of a masked layout, Mmax rows per group.

`grouped_ffn` takes rows each carrying up to k (local expert, gate weight) pairs and returns one
vector per row: sum over its pairs of weight x SwiGLU_expert(row). The pairs are laid out for the
GEMMs in one of three ways (`expert_layout` picks by the deployment's GEMMs and the step's phase):
- contiguous: pairs sorted by expert, one grouped GEMM per projection (the GPU kernels' prefill
  layout, DeepGEMM's "contiguous");
- masked: pairs packed into [El, Ce] slots (a capacity bucket per expert) for batched GEMMs (the GPU
  kernels' decode layout: static shapes; and expert parallelism with XLA's GEMMs, as XLA:CPU computes
  ragged_dot densely); an overflow is reported, and the step re-runs at a larger bucket;
- tiles: pairs packed into tiles of `tile` rows, each tile one expert's, every tile one small GEMM
  against its expert's weights (one device with XLA's GEMMs, and training: no capacity, nothing dropped).
With FP8 weights the rows are quantised 1x128 once (or arrive quantised from the dispatch) and
the gate and up projections consume them as they are; SwiGLU's output is quantised for the down
projection, as DeepSeek's expert does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.kernels import registry
from model.layers import fp8_param, param
from model.quant import dequantize_activations, quantize_activations

LAYOUTS = ("contiguous", "masked", "tiles")
MAX_TILE = 64  # rows per tile: big enough for the GEMMs, small enough that a last, part-empty tile wastes little


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExpertWeights:
    """One layer's routed experts, [out, in] per expert; the scales are None unless FP8."""
    gate: jax.Array  # [El, F, D]
    up: jax.Array  # [El, F, D]
    down: jax.Array  # [El, D, F]
    gate_scale: jax.Array | None = None  # float32 [El, F/128, D/128]
    up_scale: jax.Array | None = None
    down_scale: jax.Array | None = None

    @property
    def fp8(self) -> bool:
        return self.gate_scale is not None

    def take(self, index) -> "ExpertWeights":
        """The experts at `index` along the slot axis (a tile's expert, in the tiles layout)."""
        return jax.tree.map(lambda a: a[index], self)


class ExpertLinear(nnx.Module):
    def __init__(self, phy2log, d_in: int, d_out: int, axes, dtype, rngs, fp8: bool = False):
        n_logical = int(phy2log.max()) + 1
        shape = (n_logical, d_out, d_in)
        if fp8:  # [P, out, in] e4m3, [P, out/128, in/128]
            self.weight, self.weight_scale_inv = fp8_param(rngs, shape, axes, rows=phy2log)
        else:
            self.weight, self.weight_scale_inv = param(rngs, shape, axes, dtype, rows=phy2log), None  # [P, out, in]


class Experts(nnx.Module):
    """All routed experts of one layer, physical slots stacked so one grouped GEMM serves them."""

    def __init__(self, cfg: ModelConfig, phy2log, dtype, rngs, fp8: bool = False):
        D, F = cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = ExpertLinear(phy2log, D, F, ("expert", "expert_mlp", "embed"), dtype, rngs, fp8)
        self.up_proj = ExpertLinear(phy2log, D, F, ("expert", "expert_mlp", "embed"), dtype, rngs, fp8)
        self.down_proj = ExpertLinear(phy2log, F, D, ("expert", "embed", "expert_mlp"), dtype, rngs, fp8)
        self.gemm = "xla"  # the deployment's kernels.gemm (DeepseekV3.set_kernels)

    def weights(self) -> ExpertWeights:
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        scales = [None if p.weight_scale_inv is None else p.weight_scale_inv[...] for p in projs]
        return ExpertWeights(*(p.weight[...] for p in projs), *scales)


def expert_layout(gemm: str, expert_parallel: bool, decode: bool) -> str:
    """The layout for the deployment's GEMMs (kernels.gemm): a kernel's own, masked at decode (static
    shapes) and contiguous at prefill, as DeepGEMM's; with XLA's GEMMs, which XLA:CPU runs for ragged_dot
    as densely as for every row against every expert (docs/DESIGN_NOTES.md), expert parallelism uses the
    masked layout (per-expert capacity buckets, as the dispatch has) and one device the tiles."""
    if gemm != "xla":
        return "masked" if decode else "contiguous"
    return "masked" if expert_parallel else "tiles"


def slots_by_key(keys, n_keys: int):
    """keys int[m] in [0, n_keys] (n_keys = not placed) -> slot of each within its key, count per key [n_keys]."""
    order = jnp.argsort(keys, stable=True)
    sorted_keys = keys[order]
    # compare_all: one fused comparison (the default "scan" is a loop of its own, per layer on a GPU)
    starts = jnp.searchsorted(sorted_keys, jnp.arange(n_keys + 1), side="left", method="compare_all")
    slot_sorted = jnp.arange(keys.shape[0]) - starts[sorted_keys]
    slots = jnp.zeros_like(keys).at[order].set(slot_sorted)
    return slots, (starts[1:] - starts[:-1]).astype(jnp.int32)


def tile_rows(pairs: int, experts: int) -> int:
    """Rows per tile: about the expected pairs per expert (so the part-empty last tile of each expert
    costs at most as much again), a multiple of 8, at most MAX_TILE."""
    return int(min(MAX_TILE, max(8, -(-pairs // max(experts, 1) // 8) * 8)))


def _rows(rows, fp8: bool, dtype):
    """The FFN's input as its GEMMs take it: (e4m3, scale) for FP8 weights, else dtype rows."""
    if fp8:
        return rows if isinstance(rows, tuple) else quantize_activations(rows)
    return dequantize_activations(*rows, dtype) if isinstance(rows, tuple) else rows.astype(dtype)


def _zero_row(a):
    return jnp.concatenate([a, jnp.zeros_like(a[:1])])


def _take(x, index):
    return tuple(a[index] for a in x) if isinstance(x, tuple) else x[index]


def layout_gemm(layout: str, x, w, scale, sizes, dtype, gemm: str):
    """One projection of every group: x [G, Mmax, K] (masked: rows past counts[g] give 0) or [M, K]
    sorted by group (contiguous: group sizes), float or its FP8 pair; w [G, N, K] -> [G, Mmax, N] or
    [M, N] in dtype, by the deployment's GEMM kernel (model/kernels/registry.py)."""
    fn = registry.gemm(gemm, layout, fp8=scale is not None, n=w.shape[-2], k=w.shape[-1])
    return fn(x, w, scale, sizes, dtype)


def _swiglu(x, w: ExpertWeights, gemm, dtype):
    """The expert body on laid-out rows: gemm(x, weight, scale) per projection."""
    h = jax.nn.silu(gemm(x, w.gate, w.gate_scale)) * gemm(x, w.up, w.up_scale)
    return gemm(_rows(h, w.fp8, dtype), w.down, w.down_scale)


def _pack(pair_expert, counts, layout: str, capacity: int | None, tile: int | None):
    """(row, expert) pairs -> their group and slot in a [G, Mmax] layout, Mmax, and (tiles) each
    tile's expert [G]. masked: group = expert, Mmax = capacity (pairs past it are left out and the
    caller reports the overflow); tiles: each expert's pairs fill whole tiles of its own, and G
    covers every expert's last tile part-empty, so nothing is left out."""
    El = counts.shape[0]
    rank = slots_by_key(pair_expert, El)[0]  # position of each pair within its expert
    if layout == "masked":
        return pair_expert, rank, capacity, None
    rows = tile or tile_rows(pair_expert.shape[0], El)
    n_tiles = -(-(pair_expert.shape[0] + El * (rows - 1)) // rows)
    tiles_of = (counts + rows - 1) // rows  # [El]
    first_tile = jnp.cumsum(tiles_of) - tiles_of
    group = jnp.where(pair_expert < El, first_tile[jnp.minimum(pair_expert, El - 1)] + rank // rows, n_tiles)
    tile_expert = jnp.searchsorted(jnp.cumsum(tiles_of), jnp.arange(n_tiles), side="right")  # El: unused tile
    return group, rank % rows, rows, jnp.minimum(tile_expert, El - 1)


def grouped_ffn(rows, ids, weights, experts: ExpertWeights, layout: str, *, capacity: int | None = None,
                tile: int | None = None, dtype=None, gemm: str = "xla"):
    """rows [M, D] (float, or an (e4m3 [M, D], float32 [M, D/128]) pair quantised by the dispatch),
    ids int32[M, k] local expert ids (-1: none), weights [M, k] gate weights ->
    (out float32 [M, D], pairs per expert int32[El], overflow). dtype: of the activations between
    the GEMMs (default: the rows' dtype). capacity: rows per expert (masked; default every pair, which
    cannot overflow), rounded up to the GEMM kernel's row tile; tile: rows per tile (tiles; default
    tile_rows). gemm: the deployment's kernels.gemm."""
    if layout not in LAYOUTS:
        raise ValueError(f"expert layout {layout!r} must be one of {LAYOUTS}.")
    M, k = ids.shape
    El = experts.gate.shape[0]
    dtype = dtype or rows.dtype
    x = _rows(rows, experts.fp8, dtype)
    pair_expert = jnp.where(ids >= 0, ids, El).reshape(-1)  # [M*k]; El: no expert (padding row or slot)
    pair_w = jnp.where(ids >= 0, weights, 0.0).astype(jnp.float32).reshape(-1)
    counts = jnp.bincount(pair_expert, length=El + 1).astype(jnp.int32)[:El]

    if layout == "contiguous":
        order = jnp.argsort(pair_expert, stable=True)  # pairs of no expert sort last, outside every group
        gemm_fn = lambda a, w, s: layout_gemm("contiguous", a, w, s, counts, dtype, gemm)  # noqa: E731
        y = _swiglu(_take(x, order // k), experts, gemm_fn, dtype)
        y = y.astype(jnp.float32) * pair_w[order][:, None]
        return jnp.zeros((M, y.shape[-1]), jnp.float32).at[order // k].add(y), counts, jnp.bool_(False)

    if layout == "masked":
        align = registry.masked_rows(gemm)
        capacity = -(-(M * k if capacity is None else capacity) // align) * align
    group, slot, group_rows, tile_expert = _pack(pair_expert, counts, layout, capacity, tile)
    n_groups = El if tile_expert is None else tile_expert.shape[0]
    w = experts if tile_expert is None else experts.take(tile_expert)
    overflow = jnp.any(counts > capacity) if layout == "masked" else jnp.bool_(False)
    # [G, Mmax]: which row each slot holds (M: none, a zero row in, a discarded row out) and its weight
    # (one scatter places both: the weight as int32 bits)
    placed = jnp.stack([jnp.full((n_groups, group_rows), M, jnp.int32), jnp.zeros((n_groups, group_rows), jnp.int32)],
                       axis=-1).at[group, slot].set(jnp.stack([jnp.arange(M * k, dtype=jnp.int32) // k,
                                                               jax.lax.bitcast_convert_type(pair_w, jnp.int32)], axis=-1),
                                                    mode="drop")
    src, slot_w = placed[..., 0], jax.lax.bitcast_convert_type(placed[..., 1], jnp.float32)
    used = jnp.bincount(jnp.where(group < n_groups, group, n_groups), length=n_groups + 1)[:n_groups]
    padded = tuple(map(_zero_row, x)) if isinstance(x, tuple) else _zero_row(x)  # row M: the empty slots' input
    y = _swiglu(_take(padded, src), w, lambda a, w_, s: layout_gemm("masked", a, w_, s, used, dtype, gemm), dtype)
    y = y.astype(jnp.float32) * slot_w[..., None]
    out = jnp.zeros((M + 1, y.shape[-1]), jnp.float32).at[src].add(y)[:M]
    return out, counts, overflow
