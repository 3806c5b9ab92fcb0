"""One GPU's share of DeepSeek's deployment, timed: random weights at DeepSeek-V3's real shapes.

    python scripts/bench_shard.py --phase decode  [--scale full|small] [--json] [--steps N]
    python scripts/bench_shard.py --phase prefill [--scale full|small] [--json] [--steps N]

decode  = one rank of EP144 / DP144: all 61 layers (3 dense + 58 MoE). Attention (MLA, absorbed
          decode form over a paged BF16 latent cache) and the dense MLP / shared expert are replicated
          on every rank; each MoE layer holds 2 routed experts (256 + 32 redundant = 288 slots over
          144 ranks), FP8 e4m3 with 128x128 scales. B requests (default 128), each at KV length 4,989.
prefill = one rank of EP32 / DP32: 9 routed + 1 shared expert per MoE layer; 16K tokens per step
          made of 4K-token prompts (4 prompts), naive MLA (prefill form).

The all-to-all is replaced by the local expert work it would deliver. With n tokens on each of R
ranks choosing k = 8 of 288 slots, a rank holding El slots receives on average
n * R * k * El / 288 = n * k (token, expert) rows (decode: 8 * B over 2 experts; prefill:
8 * 16K over 9). The rank's own n tokens, each with its 8 choices, stand in for them: the real
gate picks the experts and pair (t, j) goes to local expert (logical id mod El). No dispatch or
combine communication is timed.

One jitted step: the layers of each kind are stacked and run with lax.scan (never a Python loop
over layers); the median of --steps timed calls (after warm-up, each ended by block_until_ready).

Figures (all per GPU, per step):
    tokens/s per GPU   decode: B / t                prefill: tokens / t
    tokens/s per user  decode: 1 / t                (one new token per request per step)
    ratio              tokens/s per GPU / DeepSeek's published figure
                       (decode 1,850 output tok/s at 20-22 tok/s per user; prefill 9.2k input tok/s,
                       56.3% of them cache hits); targets: decode >= 3,700 with every request
                       >= 20 tok/s, prefill >= 8,000 computed tok/s.
    decode roofline    bytes / t / HBM bandwidth (H100 SXM / H800 3.35 TB/s, H200 4.8 TB/s), with
                       bytes = replicated weights in their dtype (BF16 MLA, norms, dense MLP, shared
                               expert, gate; FP32 gate bias)
                             + routed expert weights (FP8, 1 byte each, + FP32 128x128 scales)
                             + KV cache read  B * kv_len * (kv_lora_rank + qk_rope_head_dim) * 2 bytes * 61 layers
                       (every weight and every cached row read once; the new rows' writes ignored).
    prefill roofline   FLOPs / t / dense BF16 tensor-core peak (H100 SXM, H800, H200: 989 TFLOP/s),
                       FLOPs = sum over layers of 2 * tokens * (MLA projection params incl. kv_b
                               once per token) + 2 * pairs * H * (qk_head_dim + v_head_dim)
                               [causal pairs: prompts * S * (S + 1) / 2]
                             + dense: 2 * tokens * 3 * D * intermediate
                             + MoE:   2 * tokens * (3 * D * F_shared + D * E_gate)
                                      + 2 * (8 * tokens) * 3 * D * F   [routed pairs]
                       (causal model FLOPs; "executed" FLOPs add the masked half of each chunk and the
                       repeated kv_b up-projection of the chunked naive attention).
    CPU: roofline n/a.

--scale small shrinks every dimension (hidden 256, 4 layers incl. 1 dense, ...) to run this same
code path on a CPU in seconds. --check-lowering cuda traces and lowers the full-scale step for a
GPU from abstract shapes, without allocating, to check the GPU path on a machine without one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# DeepSeek's deployment (docs/DESIGN_NOTES.md, its day-6 overview): ranks per EP group, routed slots per rank.
EXPERT_SLOTS = 256 + 32  # routed experts + redundant replicas = 32 * 9 = 144 * 2
DEPLOYMENT = {"decode": {"ranks": 144, "experts_local": 2}, "prefill": {"ranks": 32, "experts_local": 9}}
KV_LEN = 4_989  # average KV length per output token (production figures)
PUBLISHED = {"decode": 1_850.0, "prefill": 9_200.0}  # tok/s per H800 (14.8k and 73.7k per 8-GPU node)
TARGET = {"decode": 3_700.0, "prefill": 8_000.0}  # 2x, prefill in computed (cache-miss) tokens
PER_USER_MIN = 20.0  # tok/s per user, the low end of DeepSeek's 20-22
CACHE_HIT = 0.563  # share of DeepSeek's input tokens served from the on-disk KV cache
MARGIN_BYTES = 4 * 2**30  # activations, per-layer slices and compiler scratch on top of weights + KV

# name fragment -> (HBM bytes/s, dense BF16 tensor-core FLOP/s); first match wins
HARDWARE = (
    ("H200", 4.8e12, 989e12),
    ("H100 PCIE", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),
    ("H800", 3.35e12, 989e12),
)


def hardware_peaks(device_kind: str, platform: str) -> tuple[float | None, float | None]:
    if platform != "gpu":
        return None, None
    kind = device_kind.upper()
    return next(((bw, flops) for name, bw, flops in HARDWARE if name in kind), (None, None))


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about one benchmark: the model config and this rank's share of the step."""
    phase: str
    scale: str
    cfg: object  # model.ModelConfig
    ranks: int
    experts_local: int
    batch: int  # decode: requests
    kv_len: int  # decode: cached positions attended by each request (the new token's included)
    block_size: int  # decode: tokens per KV page
    prompts: int  # prefill
    prompt_len: int  # prefill
    attn_chunk: int  # prefill: query rows per naive-attention call
    attn_kernel: str  # decode attention: pallas | xla | interpret (MLA.decode_kernel)
    gemm_impl: str  # routed-expert grouped GEMM: pallas | xla | interpret
    expert_dtype: str  # fp8 | bf16

    @property
    def tokens(self) -> int:
        return self.batch if self.phase == "decode" else self.prompts * self.prompt_len

    @property
    def pages_per_request(self) -> int:
        return -(-self.kv_len // self.block_size)

    @property
    def pages_per_layer(self) -> int:
        return self.batch * self.pages_per_request


def small_config(cfg):
    """Every dimension shrunk; layer kinds, expert counts and routing rules kept."""
    return cfg.replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                       first_k_dense_replace=1, num_attention_heads=4, kv_lora_rank=64, q_lora_rank=128,
                       qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, vocab_size=1024)


SCALES = {  # decode: batch, kv_len, block_size; prefill: prompts, prompt_len, attn_chunk
    "full": dict(batch=128, kv_len=KV_LEN, block_size=64, prompts=4, prompt_len=4096, attn_chunk=1024),
    "small": dict(batch=8, kv_len=256, block_size=16, prompts=4, prompt_len=128, attn_chunk=64),
}


# ---- the rank's layers -----------------------------------------------------------------------------

def layer_class():
    from flax import nnx

    from model.attention import MLA
    from model.layers import MLP, RMSNorm
    from model.moe import Gate

    class ShardLayer(nnx.Module):
        """What one rank holds of a decoder layer besides its routed experts: the replicated part."""

        def __init__(self, cfg, moe: bool, dtype, rngs):
            D = cfg.hidden_size
            self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
            self.self_attn = MLA(cfg, dtype, rngs)
            self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps, dtype, "embed")
            if moe:
                self.gate = Gate(cfg, dtype, rngs)
                self.shared_experts = MLP(D, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, rngs)
            else:
                self.mlp = MLP(D, cfg.intermediate_size, dtype, rngs)

    return ShardLayer


def stacked_layers(cfg, moe: bool, n: int, seed: int, abstract: bool):
    """(graphdef, state with a leading [n] axis). One layer's random values repeated n times: the same
    shapes and bytes as n distinct layers, without an n-layer float32 temporary at init."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    make = functools.partial(layer_class(), cfg, moe, jnp.bfloat16)
    if abstract:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(seed))))
        return graphdef, jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), state)
    graphdef, state = nnx.split(make(nnx.Rngs(seed)))
    stack = jax.jit(lambda a: jnp.broadcast_to(a, (n, *a.shape)))
    return graphdef, jax.tree.map(stack, state)


def expert_weights(setup: Setup, n_moe: int, seed: int, abstract: bool) -> dict:
    """fp8: {gate, up, down} float8_e4m3fn [n_moe * El, K, N] in grouped_matmul's [G, K, N] layout, with
    {gate,up,down}_scale float32 [n_moe * El, K/128, N/128] (model/quant.py's 128x128 blocks); all
    layers in one array so the Pallas kernel reads a layer's experts in place (no per-layer slice copy).
    bf16: [n_moe, El, F, D] / [n_moe, El, D, F], sharding.ep.grouped_ffn_ragged's [out, in] layout."""
    import jax
    import jax.numpy as jnp

    from model.quant import FP8, quantize_blocks, scale_shape

    cfg, El = setup.cfg, setup.experts_local
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    if setup.expert_dtype == "bf16":
        shapes, dtype = {"gate": (El, F, D), "up": (El, F, D), "down": (El, D, F)}, jnp.bfloat16
    else:
        shapes, dtype = {"gate": (El, D, F), "up": (El, D, F), "down": (El, F, D)}, FP8
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        full = (n_moe, *shape) if dtype != FP8 else (n_moe * El, *shape[1:])
        if abstract:
            out[name] = jax.ShapeDtypeStruct(full, dtype)
            if dtype == FP8:
                out[name + "_scale"] = jax.ShapeDtypeStruct(scale_shape(full), jnp.float32)
            continue
        w = 0.02 * jax.random.normal(jax.random.key(seed + i), shape, jnp.float32)
        if dtype == FP8:
            q, s = jax.jit(lambda w: quantize_blocks(w, xp=jnp))(w)
            tile = jax.jit(lambda a: jnp.broadcast_to(a, (n_moe, *a.shape)).reshape(n_moe * El, *a.shape[1:]))
            out[name], out[name + "_scale"] = tile(q), tile(s)
        else:
            out[name] = jax.jit(lambda a: jnp.broadcast_to(a.astype(dtype), (n_moe, *a.shape)))(w)
    return out


def routed_experts_fp8(rows, ids, weights, experts: dict, m, setup: Setup):
    """sharding.ep.grouped_ffn_ragged with FP8 weights (it passes no w_scale): rows [M, D], ids int32[M, k]
    local experts, weights [M, k] -> float32 [M, D]. Pairs sorted by expert, three grouped GEMMs, each
    pair's output weighted and summed back onto its row (the combine's sum)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from model.kernels.grouped_gemm import grouped_matmul

    M, k = ids.shape
    El = setup.experts_local
    pair_expert = ids.reshape(-1)
    order = jnp.argsort(pair_expert, stable=True)
    counts = jnp.bincount(pair_expert, length=El).astype(jnp.int32)
    x = rows[order // k]  # [M*k, D]
    if setup.gemm_impl == "xla":  # dequantises the weights it is given: hand it this layer's only
        w = {name: lax.dynamic_slice_in_dim(a, m * El, El) for name, a in experts.items()}
        sizes = counts
    else:  # the kernel reads the layer's experts where they lie; other layers' groups are empty
        w = experts
        sizes = lax.dynamic_update_slice(jnp.zeros(experts["gate"].shape[0], jnp.int32), counts, (m * El,))
    impl, interpret = ("pallas", True) if setup.gemm_impl == "interpret" else (setup.gemm_impl, False)

    def gemm(x, name):
        return grouped_matmul(x, w[name], sizes, w[name + "_scale"], impl=impl, interpret=interpret)

    h = jax.nn.silu(gemm(x, "gate")) * gemm(x, "up")
    y = gemm(h, "down").astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((M, rows.shape[1]), jnp.float32).at[order // k].add(y)


def moe_ffn(layer, h, experts, experts_xs, m, setup: Setup):
    """Gate + this rank's routed experts (fed the rank's own tokens, see the module docstring) + shared."""
    from sharding.ep import grouped_ffn_ragged

    flat = h.reshape(-1, h.shape[-1])
    weights, ids = layer.gate(flat)
    local = ids % setup.experts_local
    if setup.expert_dtype == "bf16":
        routed, _, _ = grouped_ffn_ragged(flat, local, weights, experts_xs["gate"], experts_xs["up"],
                                          experts_xs["down"])
    else:
        routed = routed_experts_fp8(flat, local, weights, experts, m, setup)
    return routed.astype(h.dtype).reshape(h.shape) + layer.shared_experts(h)


def ffn(layer, x, experts, experts_xs, m, setup):
    import jax

    with jax.named_scope("ffn"):
        h = layer.post_attention_layernorm(x)
        h = moe_ffn(layer, h, experts, experts_xs, m, setup) if m is not None else layer.mlp(h)
    return x + h


# ---- decode ------------------------------------------------------------------------------------------

def decode_step(dense, moe, experts, pool, x, page_table, positions, *, graphdefs, setup: Setup):
    """x [B, 1, D] this rank's requests' hidden states, pool [1, L * NB, BS, C] every layer's pages
    (layer l's table = page_table + l * NB, so attention reads its pages in place), positions int32[B, 1]
    -> (x after all layers, pool with the new rows written)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model.layers import rope_cos_sin
    from model.transformer import causal_mask
    from serving.kv_cache import PagedCache

    cfg, NB = setup.cfg, setup.pages_per_layer
    cos, sin = rope_cos_sin(positions, cfg)
    mask = causal_mask(positions, page_table.shape[1] * setup.block_size)  # read by the xla path only

    def body(graphdef, moe_layers: bool):
        def layer_step(carry, xs):
            x, pool = carry
            state, layer, m, experts_xs = xs
            block = nnx.merge(graphdef, state)
            with jax.named_scope("attention"):
                cache = PagedCache(pool, page_table + layer * NB)
                block.self_attn.decode_kernel = setup.attn_kernel  # (a deployment sets it with set_kernels)
                h, cache = block.self_attn(block.input_layernorm(x), cos, sin, cache, 0, positions, mask,
                                           absorbed=True)
            x = ffn(block, x + h, experts, experts_xs, m if moe_layers else None, setup)
            return (x, cache.pool), None
        return layer_step

    n_dense = cfg.n_dense_layers
    carry = (x, pool)
    for graphdef, state, first, moe_layers in ((graphdefs[0], dense, 0, False), (graphdefs[1], moe, n_dense, True)):
        n = jax.tree.leaves(state)[0].shape[0]
        xs_experts = experts if (moe_layers and setup.expert_dtype == "bf16") else None
        xs = (state, first + jnp.arange(n, dtype=jnp.int32), jnp.arange(n, dtype=jnp.int32), xs_experts)
        carry, _ = jax.lax.scan(body(graphdef, moe_layers), carry, xs)
    return carry


def decode_inputs(setup: Setup, abstract: bool):
    """pool [1, L * NB, BS, C] (random rows: one layer's repeated), x [B, 1, D], page_table int32[B, MB]
    (a random permutation of the layer's pages), positions int32[B, 1] = kv_len - 1 for every request."""
    import jax
    import jax.numpy as jnp

    cfg = setup.cfg
    L, NB, BS, MB = cfg.num_hidden_layers, setup.pages_per_layer, setup.block_size, setup.pages_per_request
    C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    shapes = dict(pool=((1, L * NB, BS, C), jnp.bfloat16), x=((setup.batch, 1, cfg.hidden_size), jnp.bfloat16),
                  page_table=((setup.batch, MB), jnp.int32), positions=((setup.batch, 1), jnp.int32))
    if abstract:
        return {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}
    keys = jax.random.split(jax.random.key(7), 3)
    fill = jax.jit(lambda k: jnp.broadcast_to(jax.random.normal(k, (NB, BS, C), jnp.bfloat16),
                                              (L, NB, BS, C)).reshape(shapes["pool"][0]))
    return dict(pool=fill(keys[0]), x=jax.random.normal(keys[1], shapes["x"][0], jnp.bfloat16),
                page_table=jax.random.permutation(keys[2], NB).astype(jnp.int32).reshape(setup.batch, MB),
                positions=jnp.full(shapes["positions"][0], setup.kv_len - 1, jnp.int32))


# ---- prefill -----------------------------------------------------------------------------------------

def causal_naive_attention(mla, q_nope, q_pe, rows, chunk: int):
    """MLA.attend_naive over each prompt's causal prefix: prompts one at a time (lax.map), queries in
    chunks of `chunk` rows against keys [0, chunk end), so the f32 scores stay [H, chunk, S] per call."""
    import jax
    import jax.numpy as jnp

    S = q_nope.shape[1]

    def one_prompt(args):
        q_nope, q_pe, rows = (a[None] for a in args)
        outs = []
        for start in range(0, S, chunk):  # static chunks: each sees a longer, static key prefix
            end = start + chunk
            mask = jnp.arange(end)[None, None, :] <= jnp.arange(start, end)[None, :, None]
            outs.append(mla.attend_naive(q_nope[:, start:end], q_pe[:, start:end], rows[:, :end], mask))
        return jnp.concatenate(outs, axis=1)[0]

    return jax.lax.map(one_prompt, (q_nope, q_pe, rows))


def prefill_step(dense, moe, experts, x, positions, *, graphdefs, setup: Setup):
    """x [prompts, S, D] fresh prompts (no cached prefix), positions int32[prompts, S] -> x after all layers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model.layers import rope_cos_sin

    cos, sin = rope_cos_sin(positions, setup.cfg)

    def body(graphdef, moe_layers: bool):
        def layer_step(x, xs):
            state, m, experts_xs = xs
            block = nnx.merge(graphdef, state)
            mla = block.self_attn
            with jax.named_scope("attention"):
                h = block.input_layernorm(x)
                q_nope, q_pe = mla.queries(h, cos, sin)
                out = causal_naive_attention(mla, q_nope, q_pe, mla.latents(h, cos, sin), setup.attn_chunk)
                h = mla.o_proj(out.reshape(*x.shape[:2], -1))
            return ffn(block, x + h, experts, experts_xs, m if moe_layers else None, setup), None
        return layer_step

    for graphdef, state, moe_layers in ((graphdefs[0], dense, False), (graphdefs[1], moe, True)):
        n = jax.tree.leaves(state)[0].shape[0]
        xs_experts = experts if (moe_layers and setup.expert_dtype == "bf16") else None
        x, _ = jax.lax.scan(body(graphdef, moe_layers), x, (state, jnp.arange(n, dtype=jnp.int32), xs_experts))
    return x


def prefill_inputs(setup: Setup, abstract: bool):
    import jax
    import jax.numpy as jnp

    shape = (setup.prompts, setup.prompt_len)
    if abstract:
        return dict(x=jax.ShapeDtypeStruct((*shape, setup.cfg.hidden_size), jnp.bfloat16),
                    positions=jax.ShapeDtypeStruct(shape, jnp.int32))
    return dict(x=jax.random.normal(jax.random.key(7), (*shape, setup.cfg.hidden_size), jnp.bfloat16),
                positions=jnp.broadcast_to(jnp.arange(setup.prompt_len, dtype=jnp.int32), shape))


# ---- building, accounting, timing --------------------------------------------------------------------

def build(setup: Setup, abstract: bool = False):
    """-> (jitted step, its arguments as a dict in call order, bytes of each weight group)."""
    import jax

    cfg = setup.cfg
    g_dense, dense = stacked_layers(cfg, False, cfg.n_dense_layers, 1, abstract)
    g_moe, moe = stacked_layers(cfg, True, cfg.n_moe_layers, 2, abstract)
    experts = expert_weights(setup, cfg.n_moe_layers, 3, abstract)
    args = dict(dense=dense, moe=moe, experts=experts)
    if setup.phase == "decode":
        args.update(decode_inputs(setup, abstract))
        fn = jax.jit(functools.partial(decode_step, graphdefs=(g_dense, g_moe), setup=setup), donate_argnums=(3,))
    else:
        args.update(prefill_inputs(setup, abstract))
        fn = jax.jit(functools.partial(prefill_step, graphdefs=(g_dense, g_moe), setup=setup))
    nbytes = {k: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(args[k])) for k in ("dense", "moe", "experts")}
    return fn, args, nbytes


def estimate_bytes(setup: Setup) -> int:
    """Device memory for weights + KV pool (+ margin), from abstract shapes: nothing allocated."""
    import jax

    _, args, nbytes = build(setup, abstract=True)
    extra = sum(a.size * a.dtype.itemsize for k, v in args.items() if k not in nbytes for a in jax.tree.leaves(v))
    return sum(nbytes.values()) + extra + MARGIN_BYTES


def decode_bytes(setup: Setup, nbytes: dict) -> dict:
    cfg = setup.cfg
    C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv = setup.batch * setup.kv_len * C * 2 * cfg.num_hidden_layers
    return {"replicated_weights": nbytes["dense"] + nbytes["moe"], "expert_weights": nbytes["experts"],
            "kv_cache": kv, "total": nbytes["dense"] + nbytes["moe"] + nbytes["experts"] + kv}


def prefill_flops(setup: Setup) -> dict:
    cfg = setup.cfg
    D, H, T, S, n = cfg.hidden_size, cfg.num_attention_heads, setup.tokens, setup.prompt_len, setup.prompts
    R, P = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim if cfg.q_lora_rank else D * H * cfg.qk_head_dim
    proj = q + D * (R + P) + H * cfg.v_head_dim * D  # per token, without kv_b
    kv_b = R * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # per key row up-projected
    per_pair = H * (cfg.qk_head_dim + cfg.v_head_dim)
    causal_pairs = n * S * (S + 1) // 2
    c = setup.attn_chunk
    exec_pairs = n * sum(c * (i + 1) * c for i in range(S // c))  # each chunk: c queries x its key prefix
    exec_kv_rows = n * sum((i + 1) * c for i in range(S // c))
    dense_ffn = 3 * D * cfg.intermediate_size
    moe_ffn_tok = 3 * D * cfg.moe_intermediate_size * cfg.n_shared_experts + D * cfg.n_routed_experts
    routed = cfg.num_experts_per_tok * T * 3 * D * cfg.moe_intermediate_size  # 8 * tokens pairs delivered
    attn_model = 2 * (T * proj + T * kv_b + causal_pairs * per_pair)
    attn_exec = 2 * (T * proj + exec_kv_rows * kv_b + exec_pairs * per_pair)
    ffn_total = cfg.n_dense_layers * 2 * T * dense_ffn + cfg.n_moe_layers * 2 * (T * moe_ffn_tok + routed)
    L = cfg.num_hidden_layers
    return {"model": L * attn_model + ffn_total, "executed": L * attn_exec + ffn_total,
            "attention_model": L * attn_model, "ffn": ffn_total}


def time_steps(compiled, args: dict, steps: int, donated: str | None):
    """Median over `steps` timed calls after 2 warm-up calls; a donated argument is fed back each call."""
    import jax

    args = dict(args)
    times, out = [], None
    for i in range(steps + 2):
        start = time.perf_counter()
        out = compiled(*args.values())
        jax.block_until_ready(out)
        if i >= 2:
            times.append(time.perf_counter() - start)
        if donated is not None:
            args[donated] = out[1]
    return times, out


def resolve(choice: str, platform: str) -> str:
    from sharding.kernels import default_impl  # the one platform rule behind "auto"
    return default_impl(platform) if choice == "auto" else choice


def make_setup(args, platform: str):
    from model import ModelConfig

    cfg = ModelConfig.from_json(args.config)
    if args.scale == "small":
        cfg = small_config(cfg)
    sizes = dict(SCALES[args.scale])
    for name in ("batch", "kv_len", "block_size", "prompts", "prompt_len", "attn_chunk"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if sizes["prompt_len"] % sizes["attn_chunk"]:
        raise SystemExit(f"--attn-chunk {sizes['attn_chunk']} must divide the prompt length {sizes['prompt_len']}.")
    return Setup(phase=args.phase, scale=args.scale, cfg=cfg, **DEPLOYMENT[args.phase], **sizes,
                 attn_kernel=resolve(args.attn_kernel, platform), gemm_impl=resolve(args.gemm_impl, platform),
                 expert_dtype=args.expert_dtype)


def fit_batch(setup: Setup, limit: int | None, explicit: bool) -> tuple[Setup, str | None]:
    """Decode on a GPU: the largest batch whose weights + KV fit the device, when the default does not."""
    if setup.phase != "decode" or limit is None or explicit or estimate_bytes(setup) <= limit:
        return setup, None
    base = estimate_bytes(dataclasses.replace(setup, batch=1))  # bytes grow linearly with the batch
    per_request = estimate_bytes(dataclasses.replace(setup, batch=2)) - base
    batch = max(1, 1 + (limit - base) // per_request)
    note = (f"batch reduced from {setup.batch} to {batch}: weights + KV for {setup.batch} requests need "
            f"{estimate_bytes(setup) / 1e9:.1f} GB with margin, the device allows {limit / 1e9:.1f} GB "
            f"(pass --batch to force a size)")
    return dataclasses.replace(setup, batch=batch), note


# ---- the report --------------------------------------------------------------------------------------

def notes_for(setup: Setup) -> list[str]:
    cfg, El, R = setup.cfg, setup.experts_local, setup.ranks
    k = cfg.num_experts_per_tok
    n = setup.tokens
    out = [
        f"all-to-all replaced by the local expert work it would deliver: {n} tokens on each of {R} ranks x {k} "
        f"choices over {EXPERT_SLOTS} slots = {k} x {n} = {k * n} (token, expert) rows per rank on average; "
        f"this rank's own {n} tokens x {k} gate choices stand in for them, split over its {El} experts "
        f"(logical id mod {El}); no dispatch/combine communication is timed",
    ]
    if setup.expert_dtype == "fp8":
        how = ("dequantised tile by tile inside the Pallas grouped GEMM (BF16 MMA, not FP8 MMA)"
               if setup.gemm_impl != "xla" else "dequantised per layer inside the step, then lax.ragged_dot")
        out.append(f"routed experts stay FP8 e4m3 in memory with float32 128x128 scales; {how}")
    else:
        out.append("routed experts in BF16 (--expert-dtype bf16), through sharding.ep.grouped_ffn_ragged")
    out += [
        "replicated weights (MLA, dense MLP, shared expert, gate) are BF16 as the repo's modules hold them; "
        "DeepSeek keeps these in FP8 too",
        "random weights: one layer's values repeated over the stack (same shapes and bytes as distinct layers)",
        "not timed: embedding lookup, final norm + LM head, sampling, MTP, host scheduling, communication",
    ]
    if setup.phase == "decode":
        out.append(f"attention: MLA absorbed form over a paged BF16 latent pool ({setup.block_size}-token pages, "
                   f"random page order), kernel={setup.attn_kernel}; each request writes its new row at position "
                   f"{setup.kv_len - 1} and attends over {setup.kv_len}")
        out.append("DeepSeek's 20-22 tok/s per user decodes with MTP (more than one token per step); "
                   "here every request gets one token per step")
    else:
        out.append(f"attention: naive MLA (MLA.attend_naive) over fresh prompts, queries in chunks of "
                   f"{setup.attn_chunk} against their causal key prefix; roofline counts causal model FLOPs")
        out.append(f"DeepSeek's 9.2k input tok/s per GPU includes {CACHE_HIT:.1%} on-disk cache hits "
                   f"(~{PUBLISHED['prefill'] * (1 - CACHE_HIT):,.0f} computed tok/s); every token here is computed")
    return out


def kernels(setup: Setup) -> dict:
    """Prefill's naive attention is XLA einsums whatever --attn-kernel says (the kernel is decode's);
    BF16 experts go through grouped_ffn_ragged, which picks its GEMM by backend."""
    import jax

    gemm = setup.gemm_impl if setup.expert_dtype == "fp8" else resolve("auto", jax.default_backend())
    return {"attention": setup.attn_kernel if setup.phase == "decode" else "xla", "grouped_gemm": gemm,
            "expert_dtype": setup.expert_dtype}


def report(setup: Setup, times, nbytes, device, memory, extra_notes) -> dict:
    import jax

    cfg = setup.cfg
    step = statistics.median(times)
    tok_s = setup.tokens / step
    per_user = 1.0 / step if setup.phase == "decode" else None
    bandwidth, peak = hardware_peaks(device.device_kind, device.platform)
    if setup.phase == "decode":
        work = decode_bytes(setup, nbytes)
        achieved, limit, unit = work["total"] / step, bandwidth, "bytes/s"
        meets = tok_s >= TARGET["decode"] and per_user >= PER_USER_MIN
    else:
        work = prefill_flops(setup)
        achieved, limit, unit = work["model"] / step, peak, "FLOP/s"
        meets = tok_s >= TARGET["prefill"]
    shapes = {
        "layers": cfg.num_hidden_layers, "dense_layers": cfg.n_dense_layers, "moe_layers": cfg.n_moe_layers,
        "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "v_head_dim": cfg.v_head_dim,
        "intermediate": cfg.intermediate_size, "moe_intermediate": cfg.moe_intermediate_size,
        "experts_per_token": cfg.num_experts_per_tok, "routed_experts_local": setup.experts_local,
        "shared_experts": cfg.n_shared_experts, "expert_rows_per_layer": cfg.num_experts_per_tok * setup.tokens,
        "tokens_per_step": setup.tokens,
    }
    if setup.phase == "decode":
        shapes.update(batch=setup.batch, kv_len=setup.kv_len, block_size=setup.block_size,
                      cache_row=cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    else:
        shapes.update(prompts=setup.prompts, prompt_len=setup.prompt_len, attn_chunk=setup.attn_chunk)
    return {
        "device": device.device_kind, "platform": device.platform, "jax_version": jax.__version__,
        "phase": setup.phase, "scale": setup.scale, "ep_ranks": setup.ranks,
        "kernels": kernels(setup),
        "shapes": shapes,
        "steps": len(times), "step_ms": step * 1e3, "step_ms_all": [t * 1e3 for t in times],
        "tokens_per_s_per_gpu": tok_s, "tokens_per_s_per_user": per_user,
        "published_tokens_per_s_per_gpu": PUBLISHED[setup.phase], "ratio_to_published": tok_s / PUBLISHED[setup.phase],
        "target_tokens_per_s_per_gpu": TARGET[setup.phase], "target_per_user_min": PER_USER_MIN,
        "meets_target": bool(meets),
        "roofline": {"basis": "hbm_bandwidth" if setup.phase == "decode" else "bf16_tensor_core",
                     "work": work, "achieved": achieved, "unit": unit, "peak": limit,
                     "percent": None if limit is None else 100 * achieved / limit},
        "memory": memory,
        "notes": notes_for(setup) + extra_notes,
    }


def _si(x: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def print_text(r: dict) -> None:
    s, roof = r["shapes"], r["roofline"]
    print(f"bench_shard: {r['phase']}, one rank of EP{r['ep_ranks']} (scale {r['scale']})")
    print(f"device: {r['device']} ({r['platform']}), jax {r['jax_version']}")
    head = (f"{s['layers']} layers ({s['dense_layers']} dense + {s['moe_layers']} MoE), hidden {s['hidden']}, "
            f"{s['heads']} heads, kv_lora {s['kv_lora_rank']} + rope {s['qk_rope_head_dim']}, "
            f"{s['routed_experts_local']} routed ({r['kernels']['expert_dtype']}) + {s['shared_experts']} shared "
            f"experts of {s['moe_intermediate']}")
    if r["phase"] == "decode":
        work = (f"B={s['batch']} requests x KV {s['kv_len']:,} (paged, {s['block_size']}-token pages, BF16), "
                f"{s['expert_rows_per_layer']:,} expert rows per MoE layer")
    else:
        work = (f"{s['tokens_per_step']:,} tokens = {s['prompts']} prompts x {s['prompt_len']:,}, "
                f"{s['expert_rows_per_layer']:,} expert rows per MoE layer")
    print(f"shapes: {head}; {work}")
    print(f"kernels: attention {r['kernels']['attention']}, grouped GEMM {r['kernels']['grouped_gemm']}")
    times = r["step_ms_all"]
    print(f"step: {r['step_ms']:.2f} ms (median of {r['steps']}; min {min(times):.2f}, max {max(times):.2f})")
    line = f"throughput: {r['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU"
    if r["tokens_per_s_per_user"] is not None:
        line += f", {r['tokens_per_s_per_user']:.1f} tokens/s per user"
    print(line)
    goal = f">= {r['target_tokens_per_s_per_gpu']:,.0f}" + (
        f" with >= {r['target_per_user_min']:.0f} tok/s per user" if r["phase"] == "decode" else " computed")
    print(f"vs DeepSeek ({r['published_tokens_per_s_per_gpu']:,.0f} tok/s per GPU): {r['ratio_to_published']:.3f}x; "
          f"target {goal}: {'met' if r['meets_target'] else 'not met'}")
    if r["phase"] == "decode":
        w = roof["work"]
        what = (f"{_si(w['total'], 'B')} read per step (replicated weights {_si(w['replicated_weights'], 'B')} + "
                f"routed experts {_si(w['expert_weights'], 'B')} + KV {_si(w['kv_cache'], 'B')})")
        unit = "B/s"
    else:
        w = roof["work"]
        what = f"{_si(w['model'], 'FLOP')} per step (executed {_si(w['executed'], 'FLOP')})"
        unit = "FLOP/s"
    rate = _si(roof["achieved"], unit)
    peak = "n/a" if roof["peak"] is None else _si(roof["peak"], unit)
    pct = "n/a" if roof["percent"] is None else f"{roof['percent']:.1f}%"
    print(f"roofline: {what} -> {rate} = {pct} of {peak}")
    mem = r["memory"]
    if mem.get("compiled_temp_bytes") is not None:
        print(f"memory: weights {_si(mem['weights_bytes'], 'B')}, compiled temporaries "
              f"{_si(mem['compiled_temp_bytes'], 'B')}"
              + (f", device peak {_si(mem['device_peak_bytes'], 'B')}" if mem.get("device_peak_bytes") else ""))
    for note in r["notes"]:
        print(f"note: {note}")


# ---- entry point -------------------------------------------------------------------------------------

def check_lowering(setup: Setup, platform: str) -> int:
    """Traces and lowers the step for `platform` from abstract shapes; prints what kernels it calls."""
    from model.kernels import lower_for_gpu
    fn, args, nbytes = build(setup, abstract=True)
    text = lower_for_gpu(fn, *args.values(), platform=platform).as_text()
    triton = text.count("xla.gpu.triton")
    print(f"lowered {setup.phase} ({setup.scale}) for {platform}: {len(text):,} chars of StableHLO, "
          f"{triton} Triton (Pallas) kernel call sites, attention={kernels(setup)['attention']}, "
          f"gemm={kernels(setup)['grouped_gemm']}, "
          f"weights {_si(sum(nbytes.values()), 'B')}")
    return 0


def device_memory(device) -> dict:
    """The allocator's figures (bytes_limit, peak_bytes_in_use) on an accelerator; {} on a CPU."""
    return (device.memory_stats() if device.platform != "cpu" else None) or {}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("decode", "prefill"), required=True)
    ap.add_argument("--scale", choices=("full", "small"), default="full")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up calls)")
    ap.add_argument("--config", default=str(ROOT / "configs/deepseek-v3-671b/config.json"))
    ap.add_argument("--batch", type=int, help="decode requests on this rank (full: 128, small: 8)")
    ap.add_argument("--kv-len", type=int, help="decode KV length per request (full: 4,989)")
    ap.add_argument("--block-size", type=int, help="tokens per KV page (full: 64)")
    ap.add_argument("--prompts", type=int, help="prefill prompts per step (full: 4)")
    ap.add_argument("--prompt-len", type=int, help="prefill tokens per prompt (full: 4,096)")
    ap.add_argument("--attn-chunk", type=int, help="prefill query rows per attention call (full: 1,024)")
    ap.add_argument("--attn-kernel", choices=("auto", "pallas", "xla", "interpret"), default="auto",
                    help="decode attention: auto = the Pallas paged kernel on GPU, XLA elsewhere")
    ap.add_argument("--gemm-impl", choices=("auto", "pallas", "xla", "interpret"), default="auto",
                    help="routed-expert grouped GEMM: auto = Pallas on GPU, lax.ragged_dot elsewhere")
    ap.add_argument("--expert-dtype", choices=("fp8", "bf16"), default="fp8")
    ap.add_argument("--force", action="store_true", help="run --scale full on a CPU anyway")
    ap.add_argument("--check-lowering", metavar="PLATFORM", choices=("cuda", "rocm"),
                    help="lower the step for this platform from abstract shapes, then exit (no allocation)")
    ap.add_argument("--dump-hlo", metavar="FILE", help="write the compiled step's HLO text here")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # JAX keeps 75% of GPU memory by default; full-scale decode needs nearly all of an 80 GB card.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

    import jax

    if args.check_lowering:
        setup = make_setup(args, "gpu")
        return check_lowering(setup, args.check_lowering)
    device = jax.devices()[0]
    if args.scale == "full" and device.platform == "cpu" and not args.force:
        print("--scale full needs ~80 GB of accelerator memory and hours of CPU time, so it will not run on "
              "this CPU; use --scale small here, or pass --force to try anyway.", file=sys.stderr)
        return 2
    setup = make_setup(args, device.platform)
    stats = device_memory(device)
    setup, fit_note = fit_batch(setup, stats.get("bytes_limit"), explicit=args.batch is not None)

    fn, inputs, nbytes = build(setup)
    compiled = fn.lower(*inputs.values()).compile()
    analysis = compiled.memory_analysis()
    if args.dump_hlo:
        Path(args.dump_hlo).write_text(compiled.as_text())
    times, out = time_steps(compiled, inputs, args.steps, "pool" if setup.phase == "decode" else None)
    x = out[0] if setup.phase == "decode" else out
    finite = bool(jax.numpy.isfinite(x).all())
    memory = {"compiled_temp_bytes": getattr(analysis, "temp_size_in_bytes", None),
              "weights_bytes": sum(nbytes.values()),
              "device_peak_bytes": device_memory(device).get("peak_bytes_in_use"),
              "device_limit_bytes": stats.get("bytes_limit")}
    result = report(setup, times, nbytes, device, memory, [fit_note] if fit_note else [])
    result["finite"] = finite
    if args.json:
        print(json.dumps(result))
    else:
        print_text(result)
        print(f"output finite: {finite}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
