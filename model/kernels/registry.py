"""The one kernel registry: which implementation runs each hot path, for a platform, an op and a shape.

A deployment's `kernels` section (sharding/kernels.py: names only) is resolved here once, at load, for
the platform the deployment runs on (`resolve`: every "auto" by `defaults(platform)`, every name
checked, the device's SM count recorded). The model then calls the functions its resolved names map
to (`decode_attention`, `prefill_attention`, `gemm`); a kernel that cannot take a call's shape or
dtype hands that call to the XLA reference of its op (`gemm` and `decode_attention` say which, from
static shapes: the one shape rule). Nothing checks the backend at a call site.

Ops and their signatures (every name of an op has its op's):
- attention_decode(q_latent [B, H, R], q_pe [B, H, P], pool [NB, BS, C], page_table int32[B, MB],
  lengths int32[B], scale, *, plan) -> context [B, H, R]. `plan`: the step's DecodePlan
  (`decode_plan`: flash_mla.plan_decode over decode_parts(SMs, H) CTAs per head block) for the names
  in NEEDS_PLAN, else None.
- attention_prefill(q [B, S, H, D], k [B, T, H, D], v [B, T, H, V], k_end int32[B, S], scale) ->
  [B, S, H, V] (model/kernels/mla_prefill.py: attention). For "xla" the model runs its own masked
  einsums (model/attention.py), the same math.
- gemm, one function per layout; x is the activations, an (e4m3, float32 1x128 scales) pair before FP8
  weights; w the weights [..., N, K] ([out, in]: FP8 with w_scale f32 [..., N/128, K/128], or float with
  w_scale None):
    dense       (x [M, K], w [N, K], w_scale, out_dtype) -> [M, N]
    contiguous  (x [M, K] rows sorted by group, w [G, N, K], w_scale, group_sizes int32[G], out_dtype) -> [M, N]
    masked      (x [G, Mmax, K], w [G, N, K], w_scale, counts int32[G], out_dtype) -> [G, Mmax, N]
  rows past the groups (contiguous) or at or past a group's count (masked) are 0. The Mosaic kernels
  read FP8 weights as they are held: no float copy of a weight exists, and a weight that is one layer's
  slice of a scanned stack reaches them in place (XLA's dynamic-slice fusion, docs/DESIGN_NOTES.md).
Names ending in "_interpret" run the same kernel in interpret mode on the CPU (tests of the GPU path).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from model import quant
from model.kernels import flash_mla, fp8_gemm, grouped_gemm, mla_decode, mla_prefill
from sharding.ep import TRANSPORTS
from sharding.kernels import ROLES, Kernels

BLOCK = fp8_gemm.BLOCK  # the Mosaic FP8 kernels' row tile (block_m) in the masked layout


def defaults(platform: str) -> dict[str, str]:
    """What "auto" resolves to: the fastest kernels on a Hopper GPU, XLA elsewhere."""
    if platform != "gpu":
        return {"attention_decode": "xla", "attention_prefill": "xla", "gemm": "xla", "transport": "padded"}
    prefill = "tokamax" if importlib.util.find_spec("tokamax") else "xla"  # the optional gpu extra
    return {"attention_decode": "flash_mla", "attention_prefill": prefill, "gemm": "mosaic_fp8",
            "transport": "ragged"}


# ---- decode attention ------------------------------------------------------------------------------

def _decode_xla(q_latent, q_pe, pool, page_table, lengths, scale, *, plan=None):
    return mla_decode.mla_decode(q_latent, q_pe, pool, page_table, lengths, scale, block_size=pool.shape[1],
                                 impl="xla")


def _decode_triton(q_latent, q_pe, pool, page_table, lengths, scale, *, plan=None, interpret=False):
    return mla_decode.mla_decode(q_latent, q_pe, pool, page_table, lengths, scale, block_size=pool.shape[1],
                                 impl="pallas", interpret=interpret)


def _decode_flash_mla(q_latent, q_pe, pool, page_table, lengths, scale, *, plan, interpret=False):
    return flash_mla.flash_mla_decode(q_latent, q_pe, pool, page_table, lengths, scale, plan, interpret=interpret)


ATTENTION_DECODE = {
    "xla": _decode_xla,
    "triton": _decode_triton,  # the first Pallas kernel: 16 heads per program, no split (docs/KERNELS.md)
    "triton_interpret": functools.partial(_decode_triton, interpret=True),
    "flash_mla": _decode_flash_mla,
    "flash_mla_interpret": functools.partial(_decode_flash_mla, interpret=True),
}
NEEDS_PLAN = {"flash_mla", "flash_mla_interpret"}


def _decode_fits(name: str, rank: int, rope: int, block_size: int, dtype) -> bool:
    """Whether the decode kernel `name` takes this cache: flash_mla wants wgmma-sized tiles of a 16-bit
    pool, the compiled Triton kernel power-of-two sides of at least 16."""
    if name.startswith("flash_mla"):
        pages = block_size % 16 == 0 and (block_size <= 64 and 64 % block_size == 0 or block_size % 64 == 0)
        return (rank % 128 == 0 and rank <= 512 and rope % 64 == 0 and pages
                and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))
    if name == "triton":
        return all(n >= 16 and not n & (n - 1) for n in (rank, rope, block_size))
    return True


def decode_attention(name: str, *, rank: int, rope: int, block_size: int, dtype) -> tuple[str, object]:
    """-> (the name that runs, its function): `name`, or "xla" where the kernel cannot take the cache."""
    name = name if _decode_fits(name, rank, rope, block_size, dtype) else "xla"
    return name, ATTENTION_DECODE[name]


def decode_parts(num_sms: int, num_heads: int) -> int:
    """CTAs per head block for the decode split: one wave of the GPU (132 SMs, 128 heads -> 66)."""
    return max(1, num_sms // -(-num_heads // flash_mla.HEADS))


def decode_plan(name: str, lengths, num_sms: int, num_heads: int):
    """The step's KV split for a decode kernel that takes one (NEEDS_PLAN), else None: pure jnp over
    lengths int32[B], made once per step before the layer loop (PagedCache.with_plan: XLA does not hoist
    it out of the loop, its searches being loops of their own)."""
    if name not in NEEDS_PLAN:
        return None
    return flash_mla.plan_decode(lengths, decode_parts(num_sms, num_heads))


# ---- prefill attention -----------------------------------------------------------------------------

ATTENTION_PREFILL = {name: functools.partial(mla_prefill.attention, impl=name) for name in mla_prefill.IMPLS}


def prefill_attention(name: str):
    return ATTENTION_PREFILL[name]


# ---- GEMMs -----------------------------------------------------------------------------------------

def _xla_dense(x, w, w_scale, out_dtype):
    if w_scale is None:
        return jnp.einsum("mk,nk->mn", x, w.astype(x.dtype)).astype(out_dtype)
    return quant.fp8_matmul(*x, w, w_scale, out_dtype)


def _xla_contiguous(x, w, w_scale, group_sizes, out_dtype):
    if w_scale is None:  # (XLA:CPU computes ragged_dot densely: docs/DESIGN_NOTES.md)
        return grouped_gemm.grouped_matmul(x, jnp.swapaxes(w, 1, 2).astype(x.dtype), group_sizes,
                                           impl="xla").astype(out_dtype)
    return quant.fp8_grouped_matmul(*x, w, w_scale, group_sizes, out_dtype)


def _xla_masked(x, w, w_scale, counts, out_dtype):
    if w_scale is None:  # float rows past a count are zeros already, and so are their products
        return jnp.einsum("gmk,gnk->gmn", x, w.astype(x.dtype)).astype(out_dtype)
    return quant.fp8_masked_matmul(*x, w, w_scale, counts, out_dtype)


def _mosaic_dense(x, w, w_scale, out_dtype, *, interpret=False):
    return fp8_gemm.fp8_matmul(*x, w, w_scale, out_dtype, interpret=interpret)


def _mosaic_contiguous(x, w, w_scale, group_sizes, out_dtype, *, interpret=False):
    return fp8_gemm.fp8_grouped_matmul(*x, w, w_scale, group_sizes, out_dtype, interpret=interpret)


def _mosaic_masked(x, w, w_scale, counts, out_dtype, *, interpret=False):
    x_q, x_scale = x
    rows = x_q.shape[1]
    pad = -rows % BLOCK  # the kernel's row tiles; the routed experts' capacity is a multiple already
    if pad:
        x_q, x_scale = (jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (x_q, x_scale))
    out = fp8_gemm.fp8_masked_matmul(x_q, x_scale, w, w_scale, counts, out_dtype, interpret=interpret)
    return out[:, :rows] if pad else out


def _triton_contiguous(x, w, w_scale, group_sizes, out_dtype, *, interpret=False):
    # BF16 MMA: FP8 weights dequantised tile by tile in the kernel, which takes them as [G, K, N]
    if w_scale is not None:
        w_scale = jnp.swapaxes(quant.real_scales(w_scale, w.shape[-1]), 1, 2)
        x = quant.dequantize_activations(*x, out_dtype)
    return grouped_gemm.grouped_matmul(x.astype(out_dtype), jnp.swapaxes(w, 1, 2), group_sizes, w_scale,
                                       impl="pallas", interpret=interpret).astype(out_dtype)


def _mosaic(interpret: bool) -> dict:
    return {layout: functools.partial(fn, interpret=interpret)
            for layout, fn in (("dense", _mosaic_dense), ("contiguous", _mosaic_contiguous), ("masked", _mosaic_masked))}


GEMMS = {
    "xla": {"dense": _xla_dense, "contiguous": _xla_contiguous, "masked": _xla_masked},
    "mosaic_fp8": _mosaic(False),
    "mosaic_fp8_interpret": _mosaic(True),
    "triton": {"contiguous": _triton_contiguous},
    "triton_interpret": {"contiguous": functools.partial(_triton_contiguous, interpret=True)},
}
LAYOUTS = ("dense", "contiguous", "masked")


def _gemm_fits(name: str, layout: str, fp8: bool, n: int, k: int) -> bool:
    if layout not in GEMMS[name]:
        return False
    if name.startswith("mosaic_fp8"):  # FP8 x FP8 MMA; TMA rows (K bytes, N bf16 outputs) 16-byte aligned
        return fp8 and k % 16 == 0 and n % 8 == 0
    return True


def gemm(name: str, layout: str, *, fp8: bool, n: int, k: int):
    """The GEMM function for this layout under the configured name: the kernel where it takes the
    weights (FP8 or not, [.., N, K]), else the XLA reference."""
    if layout not in LAYOUTS:
        raise ValueError(f"GEMM layout {layout!r} is not one of {LAYOUTS}.")
    return GEMMS[name if _gemm_fits(name, layout, fp8, n, k) else "xla"][layout]


def masked_rows(name: str) -> int:
    """What a masked layout's rows per group should be a multiple of, so the kernel pads nothing."""
    return BLOCK if name.startswith("mosaic_fp8") else 1


# ---- one rank's rows: a kernel inside the data-parallel step --------------------------------------

@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where a step's batch rows live: split over `axis` of `mesh` (DP attention), every weight a kernel
    reads whole on each rank. Set on the model with its EP configuration (DeepseekV3.set_expert_parallel)."""
    mesh: object
    axis: str = "dp"


def per_rank(ranks: Ranks | None, fn, args: tuple, rows: tuple, out_rows: int):
    """fn(*args) with each rank running it on its own rows: one shard_map over the mesh, args[i]'s axis
    rows[i] split over the ranks (None: the same on every rank, e.g. a weight), the output's axis out_rows.
    A custom call (a Mosaic or Triton kernel) is opaque to XLA's partitioner, which would otherwise gather
    every rank's rows to run it whole on each (measured: scripts/gpu_schedule.py). Runs fn(*args) as it is
    on one device, inside a shard_map over the axis already, where the other mesh axes split the weights
    (tp > 1: left to XLA) or the rows do not split evenly."""
    if ranks is None:
        return fn(*args)
    mesh, axis = ranks.mesh, ranks.axis
    n = mesh.shape[axis]
    split = [(a, r) for a, r in zip(args, rows) if r is not None]
    whole_weights = math.prod(mesh.shape.values()) == n
    if (n == 1 or not whole_weights or axis in jax.sharding.get_abstract_mesh().manual_axes
            or any(leaf.shape[r] % n for a, r in split for leaf in jax.tree.leaves(a))):
        return fn(*args)

    def spec(r):
        return P() if r is None else P(*[None] * r, axis)
    in_specs = tuple(jax.tree.map(lambda _, r=r: spec(r), a) for a, r in zip(args, rows))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec(out_rows), check_vma=False)(*args)


def rows_per_rank(ranks: Ranks, fn, layout: str):
    """A GEMM function of `layout` run per rank (`per_rank`): the activations split over the ranks by
    rows (dense: x's axis 0; masked: axis 1 of x and of the output, each group's count made the rank's
    share of it), the weights whole. Same signature as fn."""
    if layout == "dense":
        return lambda x, w, w_scale, out_dtype: per_rank(
            ranks, lambda x, w, s: fn(x, w, s, out_dtype), (x, w, w_scale), (0, None, None), 0)
    if layout != "masked":
        raise ValueError(f"per-rank GEMMs take the dense and masked layouts, not {layout!r}.")

    def local(x, w, w_scale, counts, out_dtype):  # one rank's rows [G, Mmax / n, K] of every group
        m = jax.tree.leaves(x)[0].shape[1]
        mine = jnp.clip(counts - lax.axis_index(ranks.axis) * m, 0, m).astype(counts.dtype)
        return fn(x, w, w_scale, mine, out_dtype)
    return lambda x, w, w_scale, counts, out_dtype: per_rank(
        ranks, lambda x, w, s, c: local(x, w, s, c, out_dtype), (x, w, w_scale, counts), (1, None, None, None), 1)


def gemm_per_rank(ranks: Ranks | None, name: str, layout: str, *, fp8: bool, n: int, k: int):
    """`gemm` for a call outside the EP stages: run per rank (`rows_per_rank`) when it is a kernel; XLA's
    own GEMMs are partitioned by XLA."""
    fn = gemm(name, layout, fp8=fp8, n=n, k=k)
    return fn if ranks is None or fn is GEMMS["xla"].get(layout) else rows_per_rank(ranks, fn, layout)


# ---- resolving a deployment's section ------------------------------------------------------------

NAMES = {"attention_decode": tuple(ATTENTION_DECODE), "attention_prefill": tuple(ATTENTION_PREFILL),
         "gemm": tuple(GEMMS), "transport": TRANSPORTS}


def resolve(kernels: Kernels, platform: str, device=None) -> Kernels:
    """The section with every "auto" replaced by the platform's choice and every name checked (one
    sentence naming the field at fault); sms from the device the step runs on (its SM count) unless set."""
    names = {}
    for role in ROLES:
        name = getattr(kernels, role)
        name = defaults(platform)[role] if name == "auto" else name
        if name not in NAMES[role]:
            raise ValueError(f"kernels.{role} {name!r} is not one of {', '.join(NAMES[role])} (or auto)")
        names[role] = name
    return Kernels(**names, sms=kernels.sms or int(getattr(device, "core_count", 0) or 0))
