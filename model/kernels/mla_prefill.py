"""MLA prefill attention (naive form) for a chunk of queries over the row's whole cache, by flash attention.

Axis legend as model/attention.py: B rows, S queries in the chunk, T cache positions (cached prefix and
the chunk itself, in position order), H heads, K qk_nope, P qk_rope, V v_head_dim, R kv_lora_rank.

Prefill is compute-bound: many queries share each key, so keys and values are up-projected from the
latent cache once per call (once per chunk per layer: [B, T, H, K + P] keys, [B, T, H, V] values) and
an ordinary flash attention runs on them. A query at position p sees keys 0..p, which covers both a
fresh prompt (causal) and a chunk continuing a cached prefix (the prefix's keys come from the paged
latent cache like the chunk's); the kernel gets it as one key bound per query (k_end = p + 1), so it
never reads key blocks past a query block's last position.

Implementations (same contract): "xla" (dense scores, the reference; every backend) and tokamax's flash
attention (`pip install jaxseek[gpu]`): "tokamax" = its Mosaic GPU kernel (Hopper; 639 TFLOP/s causal at
4 x 4K, 128 heads, qk 192 / v 128 on an H200, docs/KERNELS.md), "tokamax_triton", "tokamax_cudnn", and
"tokamax_xla" (tokamax's own XLA path: checks this wiring on CPU). tokamax 0.0.17's public
dot_product_attention takes key bounds per batch row only; the per-query bound goes through its
implementation objects and their Mask (pinned version: pyproject's gpu extra).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "tokamax", "tokamax_triton", "tokamax_cudnn", "tokamax_xla")
_TOKAMAX = {"tokamax": "mosaic_gpu", "tokamax_triton": "triton", "tokamax_cudnn": "cudnn", "tokamax_xla": "xla"}


def mla_prefill(q_nope, q_pe, rows, w_k, w_v, q_positions, scale: float, *, impl: str = "xla"):
    """q_nope [B, S, H, K], q_pe [B, S, H, P] (roped), rows [B, T, C] the rows' cache in position order
    (latent R then roped shared key P: PagedCache.read), w_k [H, K, R], w_v [H, V, R] (kv_b_proj's halves),
    q_positions int32[B, S] (each query's position; -1: padding, whose output is unused) -> [B, S, H, V]
    in q_nope's dtype. Scores and softmax in float32."""
    if impl not in IMPLS:
        raise ValueError(f"prefill attention impl {impl!r} is not one of {IMPLS}.")
    B, H, R = q_nope.shape[0], q_nope.shape[2], w_k.shape[-1]
    if rows.shape[0] != B or rows.shape[-1] != R + q_pe.shape[-1]:
        raise ValueError(f"rows {rows.shape} must be [B={B}, T, kv_lora_rank {R} + rope {q_pe.shape[-1]}].")
    latent, k_pe = rows[..., :R].astype(q_nope.dtype), rows[..., R:].astype(q_nope.dtype)
    k_nope = jnp.einsum("btr,hkr->bthk", latent, w_k)  # up-projected once per chunk
    v = jnp.einsum("btr,hvr->bthv", latent, w_v)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], (*k_pe.shape[:2], H, k_pe.shape[-1]))], -1)
    q = jnp.concatenate([q_nope, q_pe], axis=-1)  # [B, S, H, K + P]
    k_end = jnp.maximum(q_positions.astype(jnp.int32) + 1, 1)  # a padding query sees key 0 (finite, unused)
    return attention(q, k, v, k_end, scale, impl=impl).astype(q_nope.dtype)


def attention(q, k, v, k_end, scale: float, *, impl: str = "xla"):
    """The core: q [B, S, H, D], k [B, T, H, D], v [B, T, H, V], k_end int32[B, S] (query s sees keys
    [0, k_end[b, s]), >= 1) -> [B, S, H, V] in q's dtype."""
    if impl == "xla":
        return _xla(q, k, v, k_end, float(scale))
    from tokamax._src.ops.attention import api, base  # the optional gpu extra
    out = api.IMPLEMENTATIONS[_TOKAMAX[impl]](q, k, v, mask=base.Mask(k_end=k_end[:, None, :]),
                                              logits_scale=float(scale))
    return out.astype(q.dtype)


def _xla(q, k, v, k_end, scale):
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
    visible = jnp.arange(k.shape[1])[None, None, None, :] < k_end[:, None, :, None]  # [B, 1, S, T]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhst,bthv->bshv", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)
