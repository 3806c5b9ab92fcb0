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
(its input quantised 1x128), kv_b_proj included in the naive form; the absorbed form folds
kv_b_proj into other products and so uses it dequantised, as DeepSeek's inference does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import Linear, RMSNorm, apply_rope

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps
MASKED = -1e30  # finite, so a padding query whose every key is masked gives zeros, not NaN


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
        self.decode_kernel = "xla"  # sharding.kernels.Kernels.attention_decode, set by DeepseekV3.set_kernels

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

    def _kv_b(self, dtype=None):
        cfg = self.cfg
        w = self.kv_b_proj.dense_weight(dtype).reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim,
                                                       cfg.kv_lora_rank)
        return w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]  # [H, K, R], [H, V, R]

    def _softmax(self, scores, mask):
        scores = jnp.where(mask[:, None], scores * self.cfg.softmax_scale, MASKED)
        return jax.nn.softmax(scores, axis=-1)

    def attend_naive(self, q_nope, q_pe, rows, mask):
        """rows [B, T, C] of the cache, mask bool[B, S, T] -> [B, S, H, V]."""
        cfg = self.cfg
        latent, k_pe = jnp.split(rows, [cfg.kv_lora_rank], axis=-1)
        kv = self.kv_b_proj(latent).reshape(*latent.shape[:2], cfg.num_attention_heads, -1)  # [B, T, H, K + V]
        k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
        scores = (jnp.einsum("bshk,bthk->bhst", q_nope, k_nope, preferred_element_type=jnp.float32)
                  + jnp.einsum("bshp,btp->bhst", q_pe, k_pe, preferred_element_type=jnp.float32))
        probs = self._softmax(scores, mask).astype(v.dtype)
        return jnp.einsum("bhst,bthv->bshv", probs, v)

    def attend_absorbed(self, q_nope, q_pe, rows, mask):
        """Same contract as attend_naive, computed in latent space."""
        w_k, w_v = self._kv_b(q_nope.dtype)
        latent, k_pe = jnp.split(rows, [self.cfg.kv_lora_rank], axis=-1)
        q_latent = jnp.einsum("bshk,hkr->bshr", q_nope, w_k)
        scores = (jnp.einsum("bshr,btr->bhst", q_latent, latent, preferred_element_type=jnp.float32)
                  + jnp.einsum("bshp,btp->bhst", q_pe, k_pe, preferred_element_type=jnp.float32))
        probs = self._softmax(scores, mask).astype(latent.dtype)
        context = jnp.einsum("bhst,btr->bshr", probs, latent)
        return jnp.einsum("bshr,hvr->bshv", context, w_v)

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
        attend = self.attend_absorbed if absorbed else self.attend_naive
        return attend(q_nope, q_pe, keys, mask)

    def output(self, core):
        """[B, S, H, V] -> o_proj -> [B, S, D]."""
        return self.o_proj(core.reshape(*core.shape[:-2], -1))

    def reads_in_place(self, cache, absorbed: bool) -> bool:
        """Decode attention by the deployment's kernel over the cache's own layout, where the cache
        offers it (the serving engine's paged pool; the dense cache always gathers rows)."""
        return absorbed and self.decode_kernel != "xla" and cache.in_place_decode

    def attend_in_cache(self, q_nope, q_pe, cache, layer, slots):
        """attend_absorbed for decode, with the cache's own kernel reading its pages in place
        (model/kernels/mla_decode.py) instead of gathering rows -> [B, S, H, V]. Several query positions
        per row (a speculative step's last token and drafts) run as S rows sharing the page table, each
        over the keys up to its own position."""
        B, S = slots.shape
        w_k, w_v = self._kv_b(q_nope.dtype)
        q_latent = jnp.einsum("bshk,hkr->bshr", q_nope, w_k).reshape(B * S, *q_nope.shape[2:3], -1)
        lengths = jnp.maximum(slots.reshape(-1) + 1, 1)  # padding rows (-1) read one row; their output is unused
        if S > 1:  # (row b's S queries stay within its rank's contiguous rows)
            cache = cache.select_rows(lambda table: jnp.repeat(table, S, axis=0))
        context = cache.absorbed_context(layer, q_latent, q_pe.reshape(B * S, *q_pe.shape[2:]), lengths,
                                         self.cfg.softmax_scale, self.decode_kernel)
        return jnp.einsum("bhr,hvr->bhv", context.astype(q_nope.dtype), w_v).reshape(B, S, *w_v.shape[:2])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class InCache:
    """Keys read in place: the cache (or a view of some of its rows, `select_rows`) and the layer."""
    cache: object  # a cache whose in_place_decode is true (serving/kv_cache.py's PagedCache)
    layer: jax.Array  # int32[]

    def select_rows(self, pick) -> "InCache":
        return InCache(self.cache.select_rows(pick), self.layer)
