"""Decoder layers, the DeepseekV3 network and its multi-token-prediction (MTP) module.

Axis legend: B batch, S positions in this call, T cache slots, D hidden, V vocab,
L layers, C = kv_lora_rank + qk_rope_head_dim (one cache row).

Layers of one kind are stacked (one array per weight kind, leading axis L) and run with
`lax.scan`, so a jitted step sees a few dozen arrays instead of 61 x 20 and compiles one
layer body per kind.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.attention import MLA
from model.config import ModelConfig
from model.layers import MLP, Linear, RMSNorm, param, rope_cos_sin
from model.moe import MoE


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, dtype, rngs):
        D = cfg.hidden_size
        self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.self_attn = MLA(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.mlp = MoE(cfg, dtype, rngs) if moe else MLP(D, cfg.intermediate_size, dtype, rngs)

    def __call__(self, x, cos, sin, cache, layer, slots, mask, absorbed):
        with jax.named_scope("attention"):
            h, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, slots, mask, absorbed)
        x = x + h
        with jax.named_scope("ffn"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, rngs):
        self.weight = param(rngs, (vocab, dim), ("vocab", "embed"), dtype)

    def __call__(self, tokens):
        return jnp.take(self.weight[...], tokens, axis=0)


class SharedHead(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, ("vocab", "embed"), dtype, rngs)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3's next-next-token module, stored as `model.layers.{num_hidden_layers + j}`.

    It combines the main model's final hidden state at position i with the embedding of token
    i+1 and predicts token i+2 (used for speculative decoding).
    """

    def __init__(self, cfg: ModelConfig, dtype, rngs):
        super().__init__(cfg, True, dtype, rngs)
        D = cfg.hidden_size
        self.embed_tokens = Embedding(cfg.vocab_size, D, dtype, rngs)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.eh_proj = Linear(2 * D, D, ("embed", None), dtype, rngs)
        self.shared_head = SharedHead(cfg, dtype, rngs)


def _stack(make_layer, n: int, rngs):
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return make_layer(r)

    return make(rngs)


def causal_mask(positions, T: int):
    """positions int32[B, S] (-1: padding) -> bool[B, S, T]: slot t is visible to a query at p iff t <= p."""
    return jnp.arange(T)[None, None, :] <= positions[:, :, None]


class DeepseekV3(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        D = cfg.hidden_size
        self.embed_tokens = Embedding(cfg.vocab_size, D, dtype, rngs)
        self.dense_layers = _stack(lambda r: DecoderLayer(cfg, False, dtype, r), cfg.n_dense_layers, rngs)
        self.moe_layers = _stack(lambda r: DecoderLayer(cfg, True, dtype, r), cfg.n_moe_layers, rngs)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.lm_head = None if cfg.tie_word_embeddings else Linear(D, cfg.vocab_size, ("vocab", "embed"), dtype, rngs)
        self.mtp = _stack(lambda r: MTPLayer(cfg, dtype, r), cfg.n_mtp_layers, rngs)

    # ---- pure math (call inside jit) --------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None, sharding=None) -> jax.Array:
        """The latent KV cache: [L, B, T, C] zeros (C = 512 + 64 for DeepSeek-V3), committed to
        `sharding` (default: the weights' device), as the caches the step returns are; an
        uncommitted first cache would cost a second compilation."""
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(min(self.embed_tokens.weight[...].devices(),
                                                             key=lambda d: d.id))
        return jax.device_put(self._zero_cache(batch, max_len, dtype), sharding)

    def _zero_cache(self, batch: int, max_len: int, dtype=None) -> jax.Array:
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        return jnp.zeros(shape, dtype or self.dtype)

    def forward_step(self, tokens, positions, cache, absorbed: bool = False):
        """Runs tokens int32[B, S] at positions int32[B, S] (-1: padding) over the cache [L, B, T, C].

        Returns the final-norm hidden states [B, S, D] and the cache with these tokens' rows written.
        A full forward, a prefill, a chunked prefill and a decode step are all this call.
        """
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(jnp.maximum(positions, 0), self.config)
        mask = causal_mask(positions, cache.shape[2])
        layer0 = 0
        for stack in (self.dense_layers, self.moe_layers):
            if stack is None:
                continue
            x, cache = _scan_layers(stack, x, cos, sin, cache, layer0, positions, mask, absorbed)
            layer0 += _stack_len(stack)
        return self.norm(x), cache

    def logits(self, hidden):
        """hidden [..., D] -> float32 logits [..., V]."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return jnp.einsum("...d,vd->...v", hidden, w[...], preferred_element_type=jnp.float32)

    def mtp_logits(self, hidden, tokens, positions):
        """Next-next-token logits [B, S, V] from the main model's hidden states [B, S, D] (after the
        final norm, as vLLM and SGLang feed DeepSeek's MTP) and the tokens [B, S] of the sequence:
        position i sees token i+1 and predicts token i+2. Uses the first MTP module."""
        assert self.mtp is not None, "this model has no MTP module"
        graphdef, stacked = nnx.split(self.mtp)
        mtp = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
        next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        e = mtp.enorm(mtp.embed_tokens(next_tokens))
        x = mtp.eh_proj(jnp.concatenate([e, mtp.hnorm(hidden)], axis=-1))
        B, S = tokens.shape
        cache = jnp.zeros((1, B, S, self.config.kv_lora_rank + self.config.qk_rope_head_dim), x.dtype)
        cos, sin = rope_cos_sin(jnp.maximum(positions, 0), self.config)
        x, _ = mtp(x, cos, sin, cache, 0, positions, causal_mask(positions, S), False)
        head = mtp.shared_head
        return jnp.einsum("...d,vd->...v", head.norm(x), head.head.weight[...], preferred_element_type=jnp.float32)

    def _full(self, tokens):
        B, S = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        hidden, _ = self.forward_step(tokens, positions, self._zero_cache(B, S))
        return hidden, positions

    def _logits_full(self, tokens):
        return self.logits(self._full(tokens)[0])

    def _mtp_full(self, tokens):
        hidden, positions = self._full(tokens)
        return self.mtp_logits(hidden, tokens, positions)

    def _step_logits(self, tokens, positions, cache, absorbed):
        hidden, cache = self.forward_step(tokens, positions, cache, absorbed)
        return self.logits(hidden), cache

    # ---- host-facing calls (each jitted on the split state) ---------------------------------------
    def __call__(self, tokens) -> jax.Array:
        """tokens int32[B, S] -> logits float32[B, S, V], full causal forward."""
        return _jit_method(self, "_logits_full", self.check_tokens(tokens))

    def mtp_forward(self, tokens) -> jax.Array:
        """tokens int32[B, S] -> MTP logits [B, S, V] (position i predicts token i+2)."""
        return _jit_method(self, "_mtp_full", self.check_tokens(tokens))

    def prefill(self, tokens, lengths, cache, start=None):
        """Writes prompts into the cache (naive MLA). tokens int32[B, S] right-padded, lengths int32[B]
        valid tokens per row, start int32[B] slots already filled (chunked prefill; default 0).
        Returns logits [B, S, V] and the cache."""
        tokens = self.check_tokens(tokens)
        B, S = tokens.shape
        start = jnp.zeros((B,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        offsets = jnp.arange(S, dtype=jnp.int32)[None]
        positions = jnp.where(offsets < jnp.asarray(lengths)[:, None], start[:, None] + offsets, -1)
        return _jit_method(self, "_step_logits", tokens, positions, cache, absorbed=False)

    def decode(self, tokens, positions, cache):
        """One token per sequence with the absorbed MLA form. tokens, positions int32[B] (-1: idle row).
        Returns logits [B, V] and the cache."""
        tokens = self.check_tokens(jnp.asarray(tokens)[:, None])
        logits, cache = _jit_method(self, "_step_logits", tokens, jnp.asarray(positions, jnp.int32)[:, None],
                                    cache, absorbed=True)
        return logits[:, 0], cache

    def check_tokens(self, tokens) -> jax.Array:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return tokens.astype(jnp.int32)

    # ---- checkpoints -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, mesh=None) -> "DeepseekV3":
        """A HF directory (config.json + safetensors, BF16/FP32 or FP8 with weight_scale_inv) or a
        directory written by `save` (Orbax)."""
        from model import checkpoint
        return checkpoint.load(path, dtype=dtype, mesh=mesh)

    def save(self, path) -> None:
        """Orbax checkpoint + config.json; reload with `from_pretrained(path)`."""
        from model import checkpoint
        checkpoint.save_orbax(self, path)


def _stack_len(stack) -> int:
    return jax.tree.leaves(nnx.state(stack))[0].shape[0]


def _scan_layers(stack, x, cos, sin, cache, layer0, slots, mask, absorbed):
    graphdef, params = nnx.split(stack)

    def body(carry, layer_params):
        x, cache, layer = carry
        x, cache = nnx.merge(graphdef, layer_params)(x, cos, sin, cache, layer, slots, mask, absorbed)
        return (x, cache, layer + 1), None

    (x, cache, _), _ = jax.lax.scan(body, (x, cache, jnp.int32(layer0)), params)
    return x, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "absorbed"))
def _run_method(graphdef, state, method, *args, **kwargs):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)


def _jit_method(net: DeepseekV3, method: str, *args, **kwargs):
    graphdef, state = nnx.split(net)
    return _run_method(graphdef, state, method, *args, **kwargs)


def param_count(net_or_state) -> int:
    state = nnx.state(net_or_state) if isinstance(net_or_state, nnx.Module) else net_or_state
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
