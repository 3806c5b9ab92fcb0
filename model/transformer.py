"""Decoder layers, the DeepseekV3 network and its multi-token-prediction (MTP) module.

Axis legend: B batch, S positions in this call, T cache slots, D hidden, V vocab,
L layers, C = kv_lora_rank + qk_rope_head_dim (one cache row).

Layers of one kind are stacked (one array per weight kind, leading axis L) and run with
`lax.scan`, so a jitted step sees a few dozen arrays instead of 61 x 20 and compiles one
layer body per kind.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.attention import MLA, absorbed_weights
from model.cache import DenseCache
from model.checkpoint import load, save_orbax  # checkpoint takes the model class as an argument: no cycle
from model.config import ModelConfig
from model.decoder import DecoderLayer, scan_layers, stack_layers  # the layer's stages; stacks of them
from model.experts import Experts
from model.kernels import registry
from model.layers import Derived, Linear, RMSNorm, param, rope_cos_sin
from model.overlap import halves, join_trees, overlapped_stack, splits
from model.quant import check_quantization


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

    def __init__(self, cfg: ModelConfig, dtype, rngs, n_physical: int | None = None, fp8: bool = False,
                 placement: dict | None = None):
        super().__init__(cfg, True, dtype, rngs, n_physical, fp8, placement)
        D = cfg.hidden_size
        self.embed_tokens = Embedding(cfg.vocab_size, D, dtype, rngs)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.eh_proj = Linear(2 * D, D, ("embed", None), dtype, rngs, fp8)
        self.shared_head = SharedHead(cfg, dtype, rngs)


def project_logits(hidden, weight):
    """hidden [..., D], weight [V, D] -> float32 logits [..., V] (a function of values: the serving
    step runs it per rank, on the rows each rank samples)."""
    return jnp.einsum("...d,vd->...v", hidden, weight, preferred_element_type=jnp.float32)


def causal_mask(positions, T: int):
    """positions int32[B, S] (-1: padding) -> bool[B, S, T]: slot t is visible to a query at p iff t <= p."""
    return jnp.arange(T)[None, None, :] <= positions[:, :, None]


class DeepseekV3(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 n_physical_experts: int | None = None, quantization: str = "none", placement: dict | None = None):
        """n_physical_experts: routed-expert slots per MoE layer (logical + redundant replicas).
        quantization "fp8": every matrix DeepSeek's release stores in FP8 (attention projections, dense
        MLP, shared and routed experts, MTP's eh_proj) is held as e4m3 + float32 128x128 scales and run
        as FP8 GEMMs; dtype is then the activations' (and the other weights'). placement: the experts'
        starting maps (model.moe.default_placement's form)."""
        check_quantization(quantization)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        self.quantization = quantization
        self.ep = None  # sharding.ep.EPConfig once the experts are spread over a mesh
        self.kernels = None  # sharding.kernels.Kernels: a deployment's resolved choices (set_kernels)
        self.compiler_options = ()  # the deployment's XLA options for its platform, (name, value) pairs: direct calls'
        D, P, fp8 = cfg.hidden_size, n_physical_experts, quantization == "fp8"
        self.embed_tokens = Embedding(cfg.vocab_size, D, dtype, rngs)
        self.dense_layers = stack_layers(lambda r: DecoderLayer(cfg, False, dtype, r, fp8=fp8), cfg.n_dense_layers, rngs)
        self.moe_layers = stack_layers(lambda r: DecoderLayer(cfg, True, dtype, r, P, fp8, placement), cfg.n_moe_layers, rngs)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
        self.lm_head = None if cfg.tie_word_embeddings else Linear(D, cfg.vocab_size, ("vocab", "embed"), dtype, rngs)
        self.mtp = stack_layers(lambda r: MTPLayer(cfg, dtype, r, P, fp8, placement), cfg.n_mtp_layers, rngs)

    def set_kernels(self, kernels) -> None:
        """The deployment's kernel choices, resolved for its platform (model/kernels/registry.py: resolve):
        each module that runs a hot path holds its name; the all-to-all transport travels on the EPConfig."""
        if not kernels.resolved:
            raise ValueError(f"set_kernels takes the kernels resolved for a platform (registry.resolve), got {kernels}")
        self.kernels = kernels
        for module in [m for _, m in nnx.iter_graph(self) if isinstance(m, (Linear, Experts, MLA))]:
            if isinstance(module, (Linear, Experts)):
                module.gemm = kernels.gemm
            elif isinstance(module, MLA):
                module.decode_kernel, module.prefill_kernel = kernels.attention_decode, kernels.attention_prefill
                module.gemm, module.sms = kernels.gemm, kernels.sms

    def refresh_derived(self) -> None:
        """Makes the weights derived from checkpoint weights again (the absorbed MLA's per-head halves of
        kv_b_proj: model/attention.py), keeping where each is placed; after a load or training."""
        @jax.jit
        def derive(w, scale):
            return absorbed_weights(w, scale, self.config)

        for stack in (self.dense_layers, self.moe_layers, self.mtp):
            if stack is None:
                continue
            kv_b, absorbed = stack.self_attn.kv_b_proj, stack.self_attn.absorbed
            scale = None if kv_b.weight_scale_inv is None else kv_b.weight_scale_inv[...]
            targets = (absorbed.w_uk_t, absorbed.w_uk_t_scale, absorbed.w_uv, absorbed.w_uv_scale)
            for var, value in zip(targets, derive(kv_b.weight[...], scale)):
                if var is not None:  # (a loader's placeholder is a ShapeDtypeStruct: where it goes)
                    var.set_value(jax.device_put(value, var.get_value().sharding))

    def set_expert_parallel(self, ep) -> None:
        """Routes every MoE layer through model/ep.py with this EPConfig (None: single device); the
        kernels outside it (projections, per-head GEMMs, prefill attention) run per rank on its mesh."""
        self.ep = ep
        ranks = None if ep is None else registry.Ranks(ep.mesh, ep.batch_axis)
        for module in [m for _, m in nnx.iter_graph(self) if isinstance(m, (Linear, MLA))]:
            module.ranks = ranks
        for stack in (self.moe_layers, self.mtp):
            if stack is not None:
                stack.mlp.ep = ep

    @property
    def parameter_bytes(self) -> int:
        """Bytes of the parameters as held: one copy of each array (replicated ones once; every
        physical expert slot, redundant replicas included; the weights derived from them too)."""
        return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self.held_weights())))

    def held_weights(self) -> nnx.State:
        """The weights held: the parameters and the weights derived from them at load."""
        return nnx.state(self, (nnx.Param, Derived))

    @property
    def n_physical_experts(self) -> int:
        stack = self.moe_layers if self.moe_layers is not None else self.mtp
        return 0 if stack is None else stack.mlp.phy2log.shape[-1]

    # ---- pure math (call inside jit) --------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None, sharding=None) -> jax.Array:
        """The latent KV cache: [L, B, T, C] zeros (C = 512 + 64 for DeepSeek-V3), committed to
        `sharding` (default: batch over the dp axis under EP, else the weights' device), as the
        caches the step returns are; an uncommitted first cache would cost a second compilation."""
        if sharding is None and self.ep is not None:
            dp = self.ep.mesh.shape[self.ep.batch_axis]
            spec = jax.sharding.PartitionSpec(None, self.ep.batch_axis if batch % dp == 0 else None)
            sharding = jax.sharding.NamedSharding(self.ep.mesh, spec)
        elif sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(min(self.embed_tokens.weight[...].devices(),
                                                             key=lambda d: d.id))
        return DenseCache(jax.device_put(self._zero_cache(batch, max_len, dtype).data, sharding))

    def _zero_cache(self, batch: int, max_len: int, dtype=None) -> DenseCache:
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        return DenseCache(jnp.zeros(shape, dtype or self.dtype))

    def forward_step(self, tokens, positions, cache, absorbed: bool = False, head=None):
        """Runs tokens int32[B, S] at positions int32[B, S] (-1: padding) over the cache (DenseCache
        [L, B, T, C] or the engine's paged cache: anything with write/read and `max_len`).

        Returns head's output (default: the final-norm hidden states [B, S, D]), the cache with these
        tokens' rows written, and the routed-expert stats per MoE layer (expert_load [L, P], rows_sent
        [L, R], overflow). head(hidden [b, S, D], rows int32[b]) -> arrays with leading axis b: it runs
        per micro-batch under the overlap schedules (the first one's under the other's last combine,
        model/overlap.py), on rows `rows` of the batch. A full forward, a prefill, a chunked prefill and a
        decode step are all this call.
        """
        head = head or (lambda hidden, rows: hidden)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(jnp.maximum(positions, 0), self.config)
        mask = causal_mask(positions, cache.max_len)
        ep = None if self.moe_layers is None else self.moe_layers.mlp.ep
        overlapped = ep is not None and ep.overlap != "none" and splits(x, ep)
        cache = self._planned(cache, positions, absorbed, ep.mesh.shape[ep.batch_axis] if overlapped else None)
        stats, out = {}, None
        if self.dense_layers is not None:
            x, cache, _ = scan_layers(self.dense_layers, x, cos, sin, cache, 0, positions, mask, absorbed)
        if self.moe_layers is not None:
            if overlapped:
                outs, cache, stats = overlapped_stack(self.moe_layers, x, cos, sin, cache, self.config.n_dense_layers,
                                                      positions, mask, absorbed, ep.overlap,
                                                      lambda x, rows: head(self.norm(x), rows))
                out = join_trees(*outs, ep.mesh.shape[ep.batch_axis])
            else:
                x, cache, stats = scan_layers(self.moe_layers, x, cos, sin, cache, self.config.n_dense_layers,
                                               positions, mask, absorbed)
                out = None
            stats = {**stats, "overflow": jnp.any(stats["overflow"])}
        if getattr(cache, "plan", None) is not None:  # made for these positions only
            cache = dataclasses.replace(cache, plan=None, part_plans=None)
        if out is None:
            out = head(self.norm(x), jnp.arange(x.shape[0], dtype=jnp.int32))
        return out, cache, stats

    def _planned(self, cache, positions, absorbed: bool, dp: int | None = None):
        """The paged cache with the decode kernel's KV split for this step's rows, made once for every
        layer (flash_mla's plan; other kernels take none), and with dp (the step runs two micro-batches,
        model/overlap.py) one for each micro-batch's rows. The rows are attend_in_cache's: each position
        of each row, reading up to it."""
        if not (absorbed and cache.in_place_decode and self.kernels is not None):
            return cache
        cfg = self.config
        name, _ = registry.decode_attention(self.kernels.attention_decode, rank=cfg.kv_lora_rank,
                                            rope=cfg.qk_rope_head_dim, block_size=cache.block_size, dtype=cache.dtype)
        if name not in registry.NEEDS_PLAN:
            return cache
        heads = cfg.num_attention_heads

        def lengths(positions):
            return jnp.maximum(positions.reshape(-1) + 1, 1)
        return cache.with_plan(lengths(positions), lambda lengths: registry.decode_plan(name, lengths, self.kernels.sms,
                                                                                        heads),
                               tuple(map(lengths, halves(positions, dp))) if dp else ())

    def logits(self, hidden):
        """hidden [..., D] -> float32 logits [..., V]."""
        return project_logits(hidden, self.head_weight())

    def head_weight(self):
        """The output projection's weight [V, D] (the embedding's when tied)."""
        return (self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)[...]

    def mtp_logits(self, hidden, tokens, positions):
        """Next-next-token logits [B, S, V] from the main model's hidden states [B, S, D] (after the
        final norm, as vLLM and SGLang feed DeepSeek's MTP) and the tokens [B, S] of the sequence:
        position i sees token i+1 and predicts token i+2. Uses the first MTP module. -> (logits, stats)"""
        next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        B, S = tokens.shape
        cache = DenseCache(jnp.zeros((1, B, S, self.config.kv_lora_rank + self.config.qk_rope_head_dim), hidden.dtype))
        _, logits, _, stats = self.mtp_step(hidden, next_tokens, positions, cache, 0)
        return logits, stats

    def mtp_step(self, hidden, next_tokens, positions, cache, layer, absorbed: bool = False):
        """The first MTP module at positions int32[B, S] over its own KV rows (cache layer `layer`):
        hidden [B, S, D] is the main model's final-norm hidden state at each position (or, to draft one
        more token, this call's own output at the position before), next_tokens [B, S] the token after
        each position. -> (its hidden states [B, S, D] before the head's norm, logits [B, S, V] float32
        of the token after next, the cache, routed-expert stats)."""
        assert self.mtp is not None, "this model has no MTP module"
        graphdef, stacked = nnx.split(self.mtp)
        mtp = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
        e = mtp.enorm(mtp.embed_tokens(next_tokens))
        x = mtp.eh_proj(jnp.concatenate([e, mtp.hnorm(hidden)], axis=-1))
        cos, sin = rope_cos_sin(jnp.maximum(positions, 0), self.config)
        x, cache, stats = mtp(x, cos, sin, cache, layer, positions, causal_mask(positions, cache.max_len), absorbed)
        if "overflow" in stats:  # per EP rank until here (model/ep.py: ep_stats)
            stats = {**stats, "overflow": jnp.any(stats["overflow"])}
        head = mtp.shared_head
        logits = jnp.einsum("...d,vd->...v", head.norm(x), head.head.weight[...], preferred_element_type=jnp.float32)
        return x, logits, cache, stats

    def draft(self, hidden, next_tokens, positions, cache, layer, last, k: int, absorbed: bool = False):
        """k draft tokens per request for speculative decoding, as DeepSeek serves its MTP module: the
        module runs over every position (the main model's hidden state there, the token after it),
        writing its own KV rows (cache layer `layer`), and drafts the token after next at position
        last int32[B]; each further draft comes from its own output at the position after (the first
        module reused; positions past the cache, and padding rows, write nothing).
        -> (drafts int32[B, k], the cache, whether an EP capacity bucket overflowed)"""
        rows = jnp.arange(hidden.shape[0])
        h, logits, cache, stats = self.mtp_step(hidden, next_tokens, positions, cache, layer, absorbed)
        h, d, p = h[rows, last], jnp.argmax(logits[rows, last], axis=-1).astype(jnp.int32), positions[rows, last]
        drafts, overflow = [d], stats.get("overflow", jnp.bool_(False))
        for i in range(1, k):
            pos = jnp.where((p >= 0) & (p + i < cache.max_len), p + i, -1)[:, None]
            h, logits, cache, stats = self.mtp_step(h[:, None], d[:, None], pos, cache, layer, absorbed)
            h, d = h[:, 0], jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            drafts, overflow = drafts + [d], overflow | stats.get("overflow", jnp.bool_(False))
        return jnp.stack(drafts, axis=1), cache, overflow

    def _full(self, tokens):
        B, S = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        hidden, _, stats = self.forward_step(tokens, positions, self._zero_cache(B, S))
        return hidden, positions, stats

    def _logits_full(self, tokens):
        hidden, _, stats = self._full(tokens)
        return self.logits(hidden), stats

    def _mtp_full(self, tokens):
        hidden, positions, stats = self._full(tokens)
        logits, mtp_stats = self.mtp_logits(hidden, tokens, positions)
        return logits, {"overflow": stats.get("overflow", False) | mtp_stats["overflow"]}

    def _step_logits(self, tokens, positions, cache, absorbed):
        return self.forward_step(tokens, positions, cache, absorbed, head=lambda hidden, rows: self.logits(hidden))

    # ---- host-facing calls (each jitted on the split state) ---------------------------------------
    def run(self, method: str, *args, **kwargs):
        """Runs a pure method jitted on the split state; its last output is the routed-expert stats.
        An overflowing dispatch re-runs at the next capacity bucket, so no token is ever dropped."""
        while True:
            out = _jit_method(self, method, *args, **kwargs)
            if self.ep is None or not bool(out[-1].get("overflow", False)):
                return out
            self.set_expert_parallel(self.ep.escalated())

    def __call__(self, tokens) -> jax.Array:
        """tokens int32[B, S] -> logits float32[B, S, V], full causal forward."""
        return self.run("_logits_full", self.check_tokens(tokens))[0]

    def mtp_forward(self, tokens) -> jax.Array:
        """tokens int32[B, S] -> MTP logits [B, S, V] (position i predicts token i+2)."""
        return self.run("_mtp_full", self.check_tokens(tokens))[0]

    def prefill(self, tokens, lengths, cache, start=None):
        """Writes prompts into the cache (naive MLA). tokens int32[B, S] right-padded, lengths int32[B]
        valid tokens per row, start int32[B] slots already filled (chunked prefill; default 0).
        Returns logits [B, S, V] and the cache."""
        tokens = self.check_tokens(tokens)
        B, S = tokens.shape
        start = jnp.zeros((B,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        offsets = jnp.arange(S, dtype=jnp.int32)[None]
        positions = jnp.where(offsets < jnp.asarray(lengths)[:, None], start[:, None] + offsets, -1)
        return self.run("_step_logits", tokens, self.check_positions(positions, cache), cache, absorbed=False)[:2]

    def decode(self, tokens, positions, cache):
        """One token per sequence with the absorbed MLA form. tokens, positions int32[B] (-1: idle row).
        Returns logits [B, V] and the cache."""
        tokens = self.check_tokens(jnp.asarray(tokens)[:, None])
        positions = self.check_positions(jnp.asarray(positions, jnp.int32)[:, None], cache)
        logits, cache, _ = self.run("_step_logits", tokens, positions, cache, absorbed=True)
        return logits[:, 0], cache

    @staticmethod
    def check_positions(positions, cache) -> jax.Array:
        """Refuses a position past the cache (its row would have nowhere to go) rather than drop it."""
        if not isinstance(positions, jax.core.Tracer) and positions.size:
            last = int(np.asarray(positions).max())  # (host numpy: a concrete array stays concrete in a trace)
            if last >= cache.max_len:
                raise ValueError(f"position {last} is past the cache of {cache.max_len} slots per sequence")
        return positions

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
    def from_pretrained(cls, path, dtype=jnp.float32, mesh=None, deployment=None, quantization=None) -> "DeepseekV3":
        """A HF directory (config.json + safetensors, BF16/FP32 or FP8 with weight_scale_inv) or a
        directory written by `save` (Orbax). With a mesh (or a deployment file, which names the mesh,
        redundant experts and dispatch precision), each device's shard is loaded straight onto it and
        the routed experts run expert-parallel. quantization: "fp8" | "none" (default: the deployment's,
        else fp8 on a GPU for an FP8 checkpoint, none otherwise); a BF16/FP32 checkpoint is quantised
        at load for fp8, an FP8 one dequantised to dtype for none."""
        return load(cls, path, dtype=dtype, mesh=mesh, deployment=deployment, quantization=quantization)

    def save(self, path) -> None:
        """Orbax checkpoint + config.json; reload with `from_pretrained(path)`."""
        save_orbax(self, path)


@functools.cache
def method_jit(compiler_options: tuple = ()):
    """The host-facing calls' jit, with the deployment's XLA options (DeepseekV3.compiler_options)."""
    return jax.jit(lambda graphdef, state, method, *args, **kwargs: getattr(nnx.merge(graphdef, state), method)(
        *args, **kwargs), static_argnames=("graphdef", "method", "absorbed"), compiler_options=dict(compiler_options))


def _jit_method(net: DeepseekV3, method: str, *args, **kwargs):
    graphdef, state = nnx.split(net)
    return method_jit(net.compiler_options)(graphdef, state, method, *args, **kwargs)


def param_count(net: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(net, nnx.Param))))
