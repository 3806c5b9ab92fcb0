"""Multi-head Latent Attention (MLA), in its two forms.

Axis legend: B batch, S query positions, T cache slots (= key positions), D hidden, H heads,
K qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim, R kv_lora_rank, C = R + P cache width.

The cache holds, per token and layer, only the normalised KV latent (R = 512) and the roped
shared key (P = 64): 576 values instead of 2 x 128 heads x 128. Two ways to attend over it:
- naive (prefill): up-project the latent to per-head keys and values, then ordinary attention;
  cheapest when many queries share the keys.
- absorbed (decode): fold kv_b_proj's key half into the query and its value half into the
  output, so attention runs directly in the 512-wide latent space and the cache is never
  expanded; cheapest for one query per sequence.
Both give the same numbers up to float rounding. With FP8 weights every projection is an FP8 GEMM
(its input quantised 1x128), kv_b_proj included. The absorbed form multiplies per head by kv_b_proj's
key half contracted over its rows and by its value half contracted over the latent; Hopper's FP8 MMA
reads both operands K-major (the contraction dimension contiguous), which the value half is as stored
and the key half is only transposed. So the absorbed form holds both halves as weights of their own,
made once at load from kv_b_proj (`AbsorbedKV`: the key half transposed [H, R, K], the value half
[H, V, R], FP8 with their 128x128 scales moved with them, exact when K and V are multiples of 128 as
DeepSeek's are), and runs them as per-head FP8 GEMMs: no float copy of an FP8 weight exists at any
time (DeepSeek's own inference dequantises kv_b_proj per call instead; docs/DESIGN_NOTES.md).
Each stage's kernel is the deployment's choice by name (model/kernels/registry.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.kernels import registry
from model.layers import Derived, Linear, RMSNorm, apply_rope
from model.quant import dequantize_weight, hold_scales, quantize_activations, quantize_blocks, real_scales

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps
MASKED = -1e30  # finite, so a padding query whose every key is masked gives zeros, not NaN


def absorbed_weights(w, scale, cfg: ModelConfig):
    """kv_b_proj's weight [..., H*(K+V), R] (and its 128x128 scales, or None) -> the absorbed form's
    weights: key half transposed [..., H, R, K], value half [..., H, V, R] (and their scales)."""
    H, K, V, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    lead = w.shape[:-2]
    if scale is not None and (K % 128 or V % 128):  # blocks straddle the halves: re-blocked (test models)
        w, scale = dequantize_weight(w, scale), None
        uk, uv = absorbed_weights(w, None, cfg)[::2]
        (uk, uk_s), (uv, uv_s) = quantize_blocks(uk, xp=jnp), quantize_blocks(uv, xp=jnp)
        return uk, hold_scales(uk_s, jnp), uv, hold_scales(uv_s, jnp)
    w = w.reshape(*lead, H, K + V, R)
    uk, uv = jnp.swapaxes(w[..., :K, :], -1, -2), w[..., K:, :]
    if scale is None:
        return uk, None, uv, None
    scale = real_scales(scale, R)  # (the held layout's padding is along R: the key half's N after the swap)
    scale = scale.reshape(*lead, H, (K + V) // 128, scale.shape[-1])  # each head's rows are whole blocks
    return (uk, hold_scales(jnp.swapaxes(scale[..., :K // 128, :], -1, -2), jnp), uv,
            hold_scales(scale[..., K // 128:, :], jnp))


class AbsorbedKV(nnx.Module):
    """The absorbed form's per-head weights, derived from kv_b_proj (not in the checkpoint): made at
    init from its value and again by every load (DeepseekV3.refresh_derived)."""

    def __init__(self, kv_b_proj: Linear, cfg: ModelConfig):
        w, s = kv_b_proj.weight[...], kv_b_proj.weight_scale_inv
        uk, uk_s, uv, uv_s = absorbed_weights(w, None if s is None else s[...], cfg)
        self.w_uk_t = Derived(uk, out_sharding=("heads", "kv_latent", None), eager_sharding=False)  # [H, R, K]
        self.w_uv = Derived(uv, out_sharding=("heads", None, "kv_latent"), eager_sharding=False)  # [H, V, R]
        scales = (None, None, None)  # (tiny: replicated)
        self.w_uk_t_scale = None if uk_s is None else Derived(uk_s, out_sharding=scales, eager_sharding=False)
        self.w_uv_scale = None if uv_s is None else Derived(uv_s, out_sharding=scales, eager_sharding=False)


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs, fp8: bool = False):
        self.cfg = cfg
        D, H, R, P = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, ("q_lora", "embed"), dtype, rngs, fp8)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, dtype, "q_lora")
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, ("heads", "q_lora"), dtype, rngs, fp8)
        else:
            self.q_proj = Linear(D, H * cfg.qk_head_dim, ("heads", "embed"), dtype, rngs, fp8)
        self.kv_a_proj_with_mqa = Linear(D, R + P, ("kv_latent", "embed"), dtype, rngs, fp8)
        self.kv_a_layernorm = RMSNorm(R, LATENT_NORM_EPS, dtype, "kv_latent")
        self.kv_b_proj = Linear(R, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), ("heads", "kv_latent"), dtype, rngs,
                                fp8)
        self.o_proj = Linear(H * cfg.v_head_dim, D, ("embed", "heads"), dtype, rngs, fp8)
        self.absorbed = AbsorbedKV(self.kv_b_proj, cfg)
        # the deployment's resolved kernels (sharding.kernels.Kernels), set by DeepseekV3.set_kernels
        self.decode_kernel, self.prefill_kernel, self.gemm, self.sms = "xla", "xla", "xla", 0
        self.ranks = None  # registry.Ranks: where the step's rows live (DeepseekV3.set_expert_parallel)

    def queries(self, x, cos, sin):
        """x [B, S, D] -> q_nope [B, S, H, K], q_pe [B, S, H, P] (roped)."""
        cfg = self.cfg
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if cfg.q_lora_rank else self.q_proj(x)
        q = q.reshape(*x.shape[:-1], cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_pe = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latents(self, x, cos, sin):
        """x [B, S, D] -> cache rows [B, S, C]: normalised latent then roped shared key."""
        kv, k_pe = jnp.split(self.kv_a_proj_with_mqa(x), [self.cfg.kv_lora_rank], axis=-1)
        return jnp.concatenate([self.kv_a_layernorm(kv), apply_rope(k_pe, cos, sin)], axis=-1)

    def _per_head(self, x, w, scale):
        """x [..., H, in] -> [..., H, out]: per head h, x[..., h, :] times w[h] [out, in] (the masked
        GEMM layout with every row used; FP8 weights take their input quantised 1x128)."""
        lead, (H, N, K) = x.shape[:-2], w.shape
        xh = jnp.swapaxes(x.reshape(-1, H, K), 0, 1)  # [H, M, in]
        counts = jnp.full((H,), xh.shape[1], jnp.int32)
        fn = registry.gemm_per_rank(self.ranks, self.gemm, "masked", fp8=scale is not None, n=N, k=K)
        out = fn(xh if scale is None else quantize_activations(xh), w, scale, counts, x.dtype)  # [H, M, out]
        return jnp.swapaxes(out, 0, 1).reshape(*lead, H, N)

    def absorb_query(self, q_nope):
        """q_nope [..., H, K] -> q_latent [..., H, R]: kv_b_proj's key half folded into the query."""
        a = self.absorbed
        return self._per_head(q_nope, a.w_uk_t[...], None if a.w_uk_t_scale is None else a.w_uk_t_scale[...])

    def absorb_output(self, context):
        """context [..., H, R] (in latent space) -> [..., H, V]: kv_b_proj's value half."""
        a = self.absorbed
        return self._per_head(context, a.w_uv[...], None if a.w_uv_scale is None else a.w_uv_scale[...])

    def _softmax(self, scores, mask):
        scores = jnp.where(mask[:, None], scores * self.cfg.softmax_scale, MASKED)
        return jax.nn.softmax(scores, axis=-1)

    def attend_naive(self, q_nope, q_pe, rows, mask, positions=None):
        """rows [B, T, C] of the cache, mask bool[B, S, T] (key t visible to the query at positions
        int32[B, S] iff t <= its position: the deployment's prefill kernel takes that bound) -> [B, S, H, V]."""
        cfg = self.cfg
        latent, k_pe = jnp.split(rows, [cfg.kv_lora_rank], axis=-1)
        kv = self.kv_b_proj(latent).reshape(*latent.shape[:2], cfg.num_attention_heads, -1)  # [B, T, H, K + V]
        k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
        if self.prefill_kernel != "xla" and positions is not None:
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], (*k_pe.shape[:2], *k_nope.shape[2:3],
                                                                               k_pe.shape[-1]))], axis=-1)
            k_end = jnp.maximum(positions + 1, 1)  # a padding query sees key 0 (finite; its output is unused)
            attend = registry.prefill_attention(self.prefill_kernel)  # a kernel: each rank on its own rows
            q = jnp.concatenate([q_nope, q_pe], axis=-1)
            return registry.per_rank(self.ranks, lambda q, k, v, k_end: attend(q, k, v, k_end, cfg.softmax_scale),
                                     (q, k, v, k_end), (0, 0, 0, 0), 0).astype(v.dtype)
        scores = (jnp.einsum("bshk,bthk->bhst", q_nope, k_nope, preferred_element_type=jnp.float32)
                  + jnp.einsum("bshp,btp->bhst", q_pe, k_pe, preferred_element_type=jnp.float32))
        probs = self._softmax(scores, mask).astype(v.dtype)
        return jnp.einsum("bhst,bthv->bshv", probs, v)

    def attend_absorbed(self, q_nope, q_pe, rows, mask):
        """Same contract as attend_naive, computed in latent space."""
        latent = rows[..., :self.cfg.kv_lora_rank]
        # q_latent . latent + q_pe . k_pe as one product over the cache rows' C = R + P columns (no
        # slice of the rows for the second)
        q_latent = self.absorb_query(q_nope)
        q_rows = jnp.concatenate([q_latent, q_pe.astype(q_latent.dtype)], axis=-1)  # [B, S, H, C]
        scores = jnp.einsum("bshc,btc->bhst", q_rows, rows, preferred_element_type=jnp.float32)
        probs = self._softmax(scores, mask).astype(latent.dtype)
        # probabilities x latents on float32 operands (the bf16 values exactly: XLA:CPU runs a bf16 x
        # bf16 dot on a slow path and has no bf16 x bf16 -> float32 one) and as a plain batched matmul
        # [B, H*S, T] x [B, T, R], which XLA:CPU hands to its fast GEMM (YNNPACK): the einsum's operand
        # order compiled to a generic dot (docs/PERFORMANCE.md, issue 31: the long-context decode
        # step). Rounded after.
        B, H, S, T = probs.shape
        context = jnp.matmul(probs.reshape(B, H * S, T).astype(jnp.float32), latent.astype(jnp.float32))
        context = context.reshape(B, H, S, -1).transpose(0, 2, 1, 3)  # [B, S, H, R]
        return self.absorb_output(context.astype(q_nope.dtype))

    def __call__(self, x, cos, sin, cache, layer, slots, mask, absorbed: bool):
        """x [B, S, D]; cache: model.cache.DenseCache or a paged equivalent; slots int32[B, S]
        (-1: padding, not written); mask bool[B, S, T].

        Writes this layer's new rows into the cache, then attends over the layer's cache
        (earlier chunks and this one alike), so prefill, chunked prefill and decode share one path.
        """
        q_nope, q_pe, cache = self.prepare(x, cos, sin, cache, layer, slots)
        core = self.core(q_nope, q_pe, self.keys(cache, layer, absorbed, x.dtype), slots, mask, absorbed)
        return self.output(core), cache

    # ---- stages (the decoder layer's schedules call them one by one: model/decoder.py) --------------
    def prepare(self, x, cos, sin, cache, layer, slots):
        """Queries, and this call's latent rows written into the cache -> (q_nope, q_pe, cache)."""
        q_nope, q_pe = self.queries(x, cos, sin)
        return q_nope, q_pe, cache.write(layer, slots, self.latents(x, cos, sin))

    def keys(self, cache, layer, absorbed: bool, dtype):
        """What core attention reads: the layer's rows [B, T, C], or the cache itself (InCache) when
        the deployment's kernel reads its pages in place."""
        if self.reads_in_place(cache, absorbed):
            return InCache(cache, jnp.asarray(layer, jnp.int32))
        return cache.read(layer).astype(dtype)

    def core(self, q_nope, q_pe, keys, slots, mask, absorbed: bool):
        """Core attention -> [B, S, H, V]."""
        if isinstance(keys, InCache):
            return self.attend_in_cache(q_nope, q_pe, keys.cache, keys.layer, slots)
        if absorbed:
            return self.attend_absorbed(q_nope, q_pe, keys, mask)
        return self.attend_naive(q_nope, q_pe, keys, mask, slots)

    def output(self, core):
        """[B, S, H, V] -> o_proj -> [B, S, D]."""
        return self.o_proj(core.reshape(*core.shape[:-2], -1))

    def reads_in_place(self, cache, absorbed: bool) -> bool:
        """Decode attention by the deployment's kernel over the cache's own layout, where the cache
        offers it (the serving engine's paged pool; the dense cache always gathers rows)."""
        return absorbed and self.decode_kernel != "xla" and cache.in_place_decode

    def attend_in_cache(self, q_nope, q_pe, cache, layer, slots):
        """attend_absorbed for decode, with the deployment's decode kernel reading the cache's pages in
        place (model/kernels/registry.py) instead of gathering rows -> [B, S, H, V]. Several query
        positions per row (a speculative step's last token and drafts) run as S rows sharing the page
        table, each over the keys up to its own position."""
        B, S = slots.shape
        cfg, H = self.cfg, q_nope.shape[2]
        q_latent = self.absorb_query(q_nope).reshape(B * S, H, -1)
        lengths = jnp.maximum(slots.reshape(-1) + 1, 1)  # padding rows (-1) read one row; their output is unused
        if S > 1:  # (row b's S queries stay within its rank's contiguous rows; the step's plan is for them)
            cache = cache.select_rows(lambda table: jnp.repeat(table, S, axis=0), plan=cache.plan)
        name, kernel = registry.decode_attention(self.decode_kernel, rank=cfg.kv_lora_rank, rope=cfg.qk_rope_head_dim,
                                                 block_size=cache.block_size, dtype=cache.dtype)

        def attend(q_latent, q_pe, pool, table, lengths, scale, plan):  # one rank's rows over its blocks
            if plan is None:  # no plan made for the step (a view of some rows): this layer's own
                plan = registry.decode_plan(name, lengths, self.sms, H)
            return kernel(q_latent, q_pe, pool, table, lengths, scale, plan=plan)
        context = cache.absorbed_context(layer, q_latent, q_pe.reshape(B * S, *q_pe.shape[2:]), lengths,
                                         cfg.softmax_scale, attend)
        return self.absorb_output(context.astype(q_nope.dtype)).reshape(B, S, H, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class InCache:
    """Keys read in place: the cache (or a view of some of its rows, `select_rows`) and the layer."""
    cache: object  # a cache whose in_place_decode is true (serving/kv_cache.py's PagedCache)
    layer: jax.Array  # int32[]

    def select_rows(self, pick) -> "InCache":
        return InCache(self.cache.select_rows(pick), self.layer)
