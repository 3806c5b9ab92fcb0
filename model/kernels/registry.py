"""The kernels of one step, by role and name: what a deployment's kernel configuration points at.

A deployment resolves each role ONCE to a name (`auto` by `default_kernels(backend)`) and the model calls
`KERNELS[role][name]`; nothing checks the backend at a call site. Every function of a role has the same
signature (below); "xla" is the plain-XLA reference of each role and runs everywhere.

- attention_decode(q_latent [B, H, R], q_pe [B, H, P], pool [NB, BS, C], page_table int32[B, MB],
  lengths int32[B], scale, *, plan) -> context [B, H, R]. `plan` is the step's DecodePlan
  (model/kernels/flash_mla.py: plan_decode(lengths, num_parts), computed once per step and shared by every
  layer) for the names in NEEDS_PLAN, else None.
- attention_prefill(q_nope [B, S, H, K], q_pe [B, S, H, P], rows [B, T, C], w_k [H, K, R], w_v [H, V, R],
  q_positions int32[B, S], scale) -> [B, S, H, V] (model/kernels/mla_prefill.py).
- expert_gemm_contiguous(x_q [M, K] e4m3, x_scale f32 [M, K/128], w_q [G, N, K] e4m3, w_scale f32
  [G, N/128, K/128], group_sizes int32[G], out_dtype) -> [M, N]; expert_gemm_masked(x_q [G, Mmax, K], x_scale
  [G, Mmax, K/128], w_q, w_scale, counts int32[G], out_dtype) -> [G, Mmax, N] (model/kernels/fp8_gemm.py).
  Their "xla" entries are the FP8 reference implementations in model/quant.py (the FP8 work owns them).

Names ending in "_interpret" run the same kernel in Pallas interpret mode on the CPU (tests of the GPU path).
"""

from __future__ import annotations

import functools
import importlib.util

from model.kernels import flash_mla, fp8_gemm, mla_decode, mla_prefill


def _decode_xla(q_latent, q_pe, pool, page_table, lengths, scale, *, plan=None):
    return mla_decode.mla_decode(q_latent, q_pe, pool, page_table, lengths, scale, block_size=pool.shape[1],
                                 impl="xla")


def _decode_triton(q_latent, q_pe, pool, page_table, lengths, scale, *, plan=None, interpret=False):
    return mla_decode.mla_decode(q_latent, q_pe, pool, page_table, lengths, scale, block_size=pool.shape[1],
                                 impl="pallas", interpret=interpret)


def _decode_flash_mla(q_latent, q_pe, pool, page_table, lengths, scale, *, plan, interpret=False):
    return flash_mla.flash_mla_decode(q_latent, q_pe, pool, page_table, lengths, scale, plan, interpret=interpret)


def _quant_reference(name: str):
    """model.quant's XLA implementation `name` (same signature), imported when called."""
    def call(*args, **kwargs):
        from model import quant
        return getattr(quant, name)(*args, impl="xla", **kwargs)
    return call


KERNELS = {
    "attention_decode": {
        "xla": _decode_xla,
        "triton": _decode_triton,  # the first Pallas kernel: 16 heads per program, no split (docs/KERNELS.md)
        "triton_interpret": functools.partial(_decode_triton, interpret=True),
        "flash_mla": _decode_flash_mla,
        "flash_mla_interpret": functools.partial(_decode_flash_mla, interpret=True),
    },
    "attention_prefill": {name: functools.partial(mla_prefill.mla_prefill, impl=name) for name in mla_prefill.IMPLS},
    "expert_gemm_contiguous": {
        "xla": _quant_reference("fp8_grouped_matmul"),
        "mosaic_fp8": fp8_gemm.fp8_grouped_matmul,
        "mosaic_fp8_interpret": functools.partial(fp8_gemm.fp8_grouped_matmul, interpret=True),
    },
    "expert_gemm_masked": {
        "xla": _quant_reference("fp8_masked_matmul"),
        "mosaic_fp8": fp8_gemm.fp8_masked_matmul,
        "mosaic_fp8_interpret": functools.partial(fp8_gemm.fp8_masked_matmul, interpret=True),
    },
}
NEEDS_PLAN = {"flash_mla", "flash_mla_interpret"}


def kernel(role: str, name: str):
    """The function a configuration names; one clear sentence when the role or name is unknown."""
    if role not in KERNELS:
        raise ValueError(f"unknown kernel role {role!r} (known: {sorted(KERNELS)}).")
    if name not in KERNELS[role]:
        raise ValueError(f"unknown {role} kernel {name!r} (known: {sorted(KERNELS[role])}).")
    return KERNELS[role][name]


def default_kernels(backend: str) -> dict[str, str]:
    """What `auto` resolves to, once per deployment: the fastest kernels on a Hopper GPU, XLA elsewhere."""
    if backend != "gpu":
        return {role: "xla" for role in KERNELS}
    prefill = "tokamax" if importlib.util.find_spec("tokamax") else "xla"  # the optional gpu extra
    return {"attention_decode": "flash_mla", "attention_prefill": prefill,
            "expert_gemm_contiguous": "mosaic_fp8", "expert_gemm_masked": "mosaic_fp8"}


def decode_parts(num_sms: int, num_heads: int) -> int:
    """CTAs per head block for the decode split: one wave of the GPU (132 SMs, 128 heads -> 66)."""
    return max(1, num_sms // -(-num_heads // flash_mla.HEADS))
