"""One GPU's share of DeepSeek's deployment, timed: random weights at DeepSeek-V3's real shapes,
run by the engine's own model code (DeepseekV3.forward_step over the paged KV cache, the MoE
block's expert path: model/experts.py) in quantization fp8 (default) or none.

    python scripts/bench_shard.py --phase decode  [--scale full|small] [--json] [--steps N]
    python scripts/bench_shard.py --phase prefill [--scale full|small] [--json] [--steps N]

decode  = one rank of EP144 / DP144: all 61 layers (3 dense + 58 MoE). Attention (MLA, absorbed
          decode form over a paged BF16 latent cache) and the dense MLP / shared expert are replicated
          on every rank; each MoE layer holds 2 routed experts (256 + 32 redundant = 288 slots over
          144 ranks). In fp8 every projection DeepSeek stores in FP8 is e4m3 with 128x128 scales and
          runs as an FP8 GEMM on 1x128-quantised activations. B requests (default 128), each at KV
          length 4,989.
prefill = one rank of EP32 / DP32: 9 routed + 1 shared expert per MoE layer; 16K tokens per step
          made of 4K-token prompts (4 prompts), each prefilled as the engine prefills a long prompt:
          chunks of --attn-chunk tokens, naive MLA over the prompt's pages so far.

The all-to-all is replaced by the local expert work it would deliver. With n tokens on each of R
ranks choosing k = 8 of 288 slots, a rank holding El slots receives on average
n * R * k * El / 288 = n * k (token, expert) rows (decode: 8 * B over 2 experts; prefill:
8 * 16K over 9). The rank's own n tokens, each with its 8 choices, stand in for them: the real
gate picks the experts and pair (t, j) goes to local expert (logical id mod El: the model's expert
maps say so, and the MoE block runs its one-device expert path, the same grouped FFN a rank runs on
its received rows under EP). No dispatch or combine communication is timed.

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
                       bytes = replicated weights as held (fp8: MLA projections, dense MLP and shared
                               expert 1 byte each + FP32 128x128 scales; BF16 norms and gate; FP32
                               gate bias)
                             + routed expert weights (fp8: 1 byte each + FP32 128x128 scales)
                             + KV cache read  B * kv_len * (kv_lora_rank + qk_rope_head_dim) * 2 bytes * 61 layers
                       (every weight and every cached row read once; the new rows' writes ignored).
    prefill roofline   FLOPs / t / dense BF16 tensor-core peak (H100 SXM, H800, H200: 989 TFLOP/s),
                       FLOPs = sum over layers of 2 * tokens * (MLA projection params incl. kv_b
                               once per token) + 2 * pairs * H * (qk_head_dim + v_head_dim)
                               [causal pairs: prompts * S * (S + 1) / 2]
                             + dense: 2 * tokens * 3 * D * intermediate
                             + MoE:   2 * tokens * (3 * D * F_shared + D * E_gate)
                                      + 2 * (8 * tokens) * 3 * D * F   [routed pairs]
                       (causal model FLOPs; "executed" FLOPs add the masked scores of each chunk
                       against the prompt's whole page table and the repeated kv_b up-projection).
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

# DeepSeek's deployment (docs/DESIGN_NOTES.md, its day-6 overview): EP144 decode, EP32 prefill, 288 slots
EXPERT_SLOTS = 256 + 32  # routed experts + redundant replicas = 32 * 9 = 144 * 2
DEPLOYMENT = {"decode": ROOT / "configs/deploy/deepseek-decode-ep144.json",
              "prefill": ROOT / "configs/deploy/deepseek-prefill-ep32.json"}
KV_LEN = 4_989  # average KV length per output token (production figures)
PUBLISHED = {"decode": 1_850.0, "prefill": 9_200.0}  # tok/s per H800 (14.8k and 73.7k per 8-GPU node)
TARGET = {"decode": 3_700.0, "prefill": 8_000.0}  # 2x, prefill in computed (cache-miss) tokens
PER_USER_MIN = 20.0  # tok/s per user, the low end of DeepSeek's 20-22
CACHE_HIT = 0.563  # share of DeepSeek's input tokens served from the on-disk KV cache
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
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
    kernels: object  # sharding.kernels.Kernels, resolved for the platform (model/kernels/registry.py)
    quantization: str  # fp8 | none
    platform: str = "cpu"  # what the step is built for (decided once: the device's, or --platform)
    compiler_options: tuple = ()  # the step's jit compiler_options (the deployment's for the platform)
    dtype: str = "bf16"  # activations, KV pool and non-FP8 weights: bf16 | fp32
    mtp: int = 0  # decode: MTP draft tokens per request (the step verifies 1 + mtp query rows and drafts anew)

    @property
    def tokens(self) -> int:
        """Query rows per step."""
        return self.batch * (1 + self.mtp) if self.phase == "decode" else self.prompts * self.prompt_len

    @property
    def pages_per_request(self) -> int:
        return -(-(self.kv_len + self.mtp) // self.block_size)

    @property
    def pages_per_layer(self) -> int:
        return self.batch * self.pages_per_request


def small_config(cfg):
    """Every dimension shrunk; layer kinds, expert counts and routing rules kept, and the GPU kernels' tile
    sizes (the latent a multiple of 128 and the rope width of 64 flash_mla reads, so kv_a_proj's N of 192 is
    off the GEMM's 128-wide tiles as DeepSeek's 576 is; the per-head halves of kv_b_proj 128-aligned)."""
    return cfg.replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                       first_k_dense_replace=1, num_attention_heads=4, kv_lora_rank=128, q_lora_rank=128,
                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=1024)


SCALES = {  # decode: batch, kv_len, block_size; prefill: prompts, prompt_len, attn_chunk
    "full": dict(batch=128, kv_len=KV_LEN, block_size=64, prompts=4, prompt_len=4096, attn_chunk=1024),
    "small": dict(batch=8, kv_len=256, block_size=16, prompts=4, prompt_len=128, attn_chunk=64),
}


# ---- the rank's model ------------------------------------------------------------------------------

def rank_placement(n_logical: int, experts_local: int) -> dict:
    """Expert maps for one rank's view: its El slots stand in for every expert, logical id e routed to
    slot e mod El (model.moe.default_placement's form)."""
    import numpy as np

    return {"phy2log": np.arange(experts_local, dtype=np.int32),
            "log2phy": (np.arange(n_logical, dtype=np.int32) % experts_local)[:, None],
            "logcnt": np.ones(n_logical, np.int32)}


def rank_model(setup: Setup, seed: int, abstract: bool):
    """(graphdef, state) of the engine's DeepseekV3 (no MTP) holding one rank's share: every replicated
    weight, and El routed expert slots per MoE layer, in setup.quantization. One layer's random values
    repeated over each stack: the same shapes and bytes as distinct layers, without building (and
    initialising in float32) 61 of them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model import DeepseekV3

    cfg = setup.cfg.replace(num_nextn_predict_layers=1 if setup.mtp else 0)
    one = cfg.replace(num_hidden_layers=1 + min(cfg.n_dense_layers, 1), first_k_dense_replace=min(cfg.n_dense_layers, 1))
    placement = rank_placement(cfg.n_routed_experts, setup.experts_local)

    def make():
        return DeepseekV3(one, DTYPES[setup.dtype], nnx.Rngs(seed), setup.experts_local, setup.quantization, placement)

    net = nnx.eval_shape(make) if abstract else make()
    sizes = {"dense_layers": cfg.n_dense_layers, "moe_layers": cfg.n_moe_layers}
    for name, n in sizes.items():
        stack = getattr(net, name)
        if stack is None:
            continue
        if abstract:
            tiled = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape[1:]), a.dtype), nnx.state(stack))
        else:
            tiled = jax.tree.map(jax.jit(lambda a: jnp.broadcast_to(a, (n, *a.shape[1:]))),
                                 nnx.state(stack))
        nnx.update(stack, tiled)
    net.config = cfg  # the whole model's layer counts (the stacks' offsets, the cache's layers)
    net.set_kernels(setup.kernels)
    return nnx.split(net)


def weight_bytes(state) -> dict:
    """Bytes of the weights each step reads: the replicated ones of the dense and MoE stacks, and the
    routed experts (FP8: one byte per weight plus float32 scales)."""
    import jax

    def total(tree):
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))

    experts = total(state["moe_layers"]["mlp"]["experts"]) if "moe_layers" in state else 0
    moe = total(state["moe_layers"]) - experts if "moe_layers" in state else 0
    maps = sum(total(state["moe_layers"]["mlp"][k]) for k in ("phy2log", "log2phy", "logcnt")) if moe else 0
    dense = total(state["dense_layers"]) if "dense_layers" in state else 0
    mtp = total(state["mtp"]) if "mtp" in state else 0  # its experts included
    return {"dense": dense, "moe": moe - maps, "experts": experts, "mtp": mtp}


# ---- decode ------------------------------------------------------------------------------------------

def decode_step(state, pool, tokens, page_table, positions, *, graphdef, setup: Setup):
    """One engine decode step's forward (DeepseekV3.forward_step, absorbed MLA) over a paged cache:
    tokens int32[B, W] at positions [B, W] (W = 1 + mtp: the last token and its drafts), pool
    [L, NB, BS, C] (NB = the batch's pages per layer; one more layer for the MTP module), page_table
    int32[B, MB] -> (hidden [B, W, D], the pool with the new rows written, the next drafts [B, mtp]).
    With MTP, the module drafts as the engine's step does (DeepseekV3.draft)."""
    import jax.numpy as jnp
    from flax import nnx

    from serving.kv_cache import PagedCache

    net = nnx.merge(graphdef, state)
    hidden, cache, _ = net.forward_step(tokens, positions, PagedCache(pool, page_table), absorbed=True)
    if not setup.mtp:
        return hidden, cache.pool, jnp.zeros((tokens.shape[0], 0), jnp.int32)
    last = jnp.full(tokens.shape[:1], tokens.shape[1] - 1)  # every draft verified: draft from the last row
    drafts, cache, _ = net.draft(hidden, tokens, positions, cache, jnp.int32(setup.cfg.num_hidden_layers), last,
                                 setup.mtp, absorbed=True)
    return hidden, cache.pool, drafts


def decode_inputs(setup: Setup, abstract: bool):
    """pool [L, NB, BS, C] (random rows: one layer's repeated), tokens int32[B, 1], page_table
    int32[B, MB] (a random permutation of the layer's pages), positions int32[B, 1] = kv_len - 1."""
    import jax
    import jax.numpy as jnp

    cfg = setup.cfg
    L, NB, BS, MB = cfg.num_hidden_layers, setup.pages_per_layer, setup.block_size, setup.pages_per_request
    L, W = L + (1 if setup.mtp else 0), 1 + setup.mtp  # the MTP module's KV rows: one more layer
    C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    shapes = dict(pool=((L, NB, BS, C), DTYPES[setup.dtype]), tokens=((setup.batch, W), jnp.int32),
                  page_table=((setup.batch, MB), jnp.int32), positions=((setup.batch, W), jnp.int32))
    if abstract:
        return {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}
    keys = jax.random.split(jax.random.key(7), 3)
    fill = jax.jit(lambda k: jnp.broadcast_to(jax.random.normal(k, (NB, BS, C), DTYPES[setup.dtype]), (L, NB, BS, C)))
    return dict(pool=fill(keys[0]),
                tokens=jax.random.randint(keys[1], shapes["tokens"][0], 0, cfg.vocab_size, jnp.int32),
                page_table=jax.random.permutation(keys[2], NB).astype(jnp.int32).reshape(setup.batch, MB),
                positions=jnp.broadcast_to(setup.kv_len - 1 + jnp.arange(W, dtype=jnp.int32), (setup.batch, W)))


# ---- prefill -----------------------------------------------------------------------------------------

def prefill_step(state, pool, tokens, page_table, *, graphdef, setup: Setup):
    """Fresh prompts tokens int32[prompts, S] prefilled as the engine does a long prompt: chunks of
    attn_chunk tokens, each one forward_step (naive MLA) writing its rows into the paged cache and
    attending over the prompt's pages so far (the rest masked) -> (last chunk's hidden, pool)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from serving.kv_cache import PagedCache

    net = nnx.merge(graphdef, state)
    n, S = tokens.shape
    chunk = setup.attn_chunk
    chunks = tokens.reshape(n, S // chunk, chunk).swapaxes(0, 1)  # [S / chunk, prompts, chunk]

    def one_chunk(pool, xs):
        toks, c = xs
        positions = jnp.broadcast_to(c * chunk + jnp.arange(chunk, dtype=jnp.int32), (n, chunk))
        hidden, cache, _ = net.forward_step(toks, positions, PagedCache(pool, page_table), absorbed=False)
        return cache.pool, hidden[:, -1]

    pool, last = jax.lax.scan(one_chunk, pool, (chunks, jnp.arange(S // chunk, dtype=jnp.int32)))
    return last[-1], pool


def prefill_inputs(setup: Setup, abstract: bool):
    """pool [L, prompts * S / BS, BS, C] (zeros: fresh prompts), tokens int32[prompts, S], page_table
    int32[prompts, S / BS] (each prompt's own pages)."""
    import jax
    import jax.numpy as jnp

    cfg = setup.cfg
    pages = setup.prompt_len // setup.block_size
    C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    shapes = dict(pool=((cfg.num_hidden_layers, setup.prompts * pages, setup.block_size, C), DTYPES[setup.dtype]),
                  tokens=((setup.prompts, setup.prompt_len), jnp.int32), page_table=((setup.prompts, pages), jnp.int32))
    if abstract:
        return {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}
    return dict(pool=jnp.zeros(*shapes["pool"]),
                tokens=jax.random.randint(jax.random.key(7), shapes["tokens"][0], 0, cfg.vocab_size, jnp.int32),
                page_table=jnp.arange(setup.prompts * pages, dtype=jnp.int32).reshape(setup.prompts, pages))


# ---- building, accounting, timing --------------------------------------------------------------------

def build(setup: Setup, abstract: bool = False):
    """-> (jitted step, its arguments as a dict in call order, bytes of each weight group)."""
    import jax

    graphdef, state = rank_model(setup, 1, abstract)
    args = dict(state=state)
    options = {"compiler_options": dict(setup.compiler_options)} if setup.compiler_options else {}
    if setup.phase == "decode":
        args.update(decode_inputs(setup, abstract))
        fn = jax.jit(functools.partial(decode_step, graphdef=graphdef, setup=setup), donate_argnums=(1,), **options)
    else:
        args.update(prefill_inputs(setup, abstract))
        fn = jax.jit(functools.partial(prefill_step, graphdef=graphdef, setup=setup), donate_argnums=(1,), **options)
    return fn, args, weight_bytes(state)


def estimate_bytes(setup: Setup) -> int:
    """Device memory for weights + KV pool (+ margin), from abstract shapes: nothing allocated."""
    import jax

    _, args, _ = build(setup, abstract=True)
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(args)) + MARGIN_BYTES


def decode_bytes(setup: Setup, nbytes: dict) -> dict:
    cfg = setup.cfg
    C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    layers = cfg.num_hidden_layers + (1 if setup.mtp else 0)  # the MTP module reads its own KV rows
    kv = setup.batch * setup.kv_len * C * (2 if setup.dtype == "bf16" else 4) * layers
    replicated = nbytes["dense"] + nbytes["moe"] + nbytes["mtp"]  # (the MTP module counted whole here)
    return {"replicated_weights": replicated, "expert_weights": nbytes["experts"],
            "kv_cache": kv, "total": replicated + nbytes["experts"] + kv}


def prefill_flops(setup: Setup) -> dict:
    cfg = setup.cfg
    D, H, T, S, n = cfg.hidden_size, cfg.num_attention_heads, setup.tokens, setup.prompt_len, setup.prompts
    R, P = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim if cfg.q_lora_rank else D * H * cfg.qk_head_dim
    proj = q + D * (R + P) + H * cfg.v_head_dim * D  # per token, without kv_b
    kv_b = R * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # per key row up-projected
    per_pair = H * (cfg.qk_head_dim + cfg.v_head_dim)
    causal_pairs = n * S * (S + 1) // 2
    chunks = S // setup.attn_chunk
    exec_pairs = n * S * S  # each chunk's queries against all S slots of the prompt's pages (masked past it)
    exec_kv_rows = n * chunks * S  # each chunk up-projects every slot it reads
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


def make_setup(args, platform: str, device=None):
    """The benchmark's setup for a platform (the device's, or --platform for a step compiled ahead of
    time): one rank of the deployment file's mesh, its quantization, kernels resolved for the platform
    (flags override the file's) and the platform's XLA options."""
    import dataclasses as dc

    from model import ModelConfig
    from model.kernels import registry
    from sharding.deployment import Deployment

    platform = args.platform or platform
    dep = Deployment.from_json(args.deployment or DEPLOYMENT[args.phase])
    cfg = ModelConfig.from_json(args.config)
    slots = dep.n_physical_experts(cfg.n_routed_experts)
    if args.scale == "small":
        cfg = small_config(cfg)
    flags = {"attention_decode": args.attn_kernel, "attention_prefill": args.prefill_kernel, "gemm": args.gemm}
    kernels = dc.replace(dep.kernels, **{k: v for k, v in flags.items() if v != "auto"})
    sizes = dict(SCALES[args.scale])
    for name in ("batch", "kv_len", "block_size", "prompts", "prompt_len", "attn_chunk"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if sizes["prompt_len"] % sizes["attn_chunk"]:
        raise SystemExit(f"--attn-chunk {sizes['attn_chunk']} must divide the prompt length {sizes['prompt_len']}.")
    return Setup(phase=args.phase, scale=args.scale, cfg=cfg, ranks=dep.ep_size, experts_local=slots // dep.ep_size,
                 **sizes, kernels=registry.resolve(kernels, platform, device),
                 quantization=args.quantization or dep.quantization or "fp8", dtype=args.dtype,
                 mtp=getattr(args, "mtp", 0), platform=platform,
                 compiler_options=tuple(sorted(dep.xla_options(platform).items())))


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
    if setup.quantization == "fp8":
        how = {"xla": "XLA references (both operands dequantised to float32)",
               "mosaic_fp8": "the Mosaic GPU FP8 x FP8 kernels (model/kernels/fp8_gemm.py: masked layout at decode, "
                             "contiguous at prefill, one group for a projection)",
               "triton": "the Pallas grouped GEMM for routed experts (FP8 weights dequantised tile by tile, BF16 "
                         "MMA), XLA references elsewhere"}.get(setup.kernels.gemm.removesuffix("_interpret"), setup.kernels.gemm)
        out.append(f"quantization fp8: MLA projections (the absorbed form's per-head halves of kv_b_proj included), "
                   f"dense MLP, shared and routed experts stay FP8 e4m3 with float32 128x128 scales, activations "
                   f"quantised 1x128 before each GEMM; GEMMs: {how}; lm_head BF16 (as DeepSeek's release)")
    else:
        out.append("quantization none: every weight BF16")
    out += [
        "the engine's own model: DeepseekV3.forward_step with this rank's expert maps (model code, not a copy)",
        "random weights: one layer's values repeated over the stack (same shapes and bytes as distinct layers)",
        "not timed: final LM head, sampling, " + ("" if setup.mtp else "MTP, ") + "host scheduling, communication",
    ]
    if setup.phase == "decode":
        out.append(f"attention: MLA absorbed form over a paged {setup.dtype} latent pool ({setup.block_size}-token pages, "
                   f"random page order), kernel={setup.kernels.attention_decode}; each request writes its new row at position "
                   f"{setup.kv_len - 1} and attends over {setup.kv_len}")
        if setup.mtp:
            out.append(f"MTP: {1 + setup.mtp} query rows per request (the last token and {setup.mtp} draft(s)), "
                       f"then the MTP module drafts anew; tokens per request and step are the expected "
                       f"1 + a + ... + a^{setup.mtp} at the given per-draft acceptance a, not measured acceptance")
        else:
            out.append("DeepSeek's 20-22 tok/s per user decodes with MTP (more than one token per step); "
                       "here every request gets one token per step (--mtp K adds it)")
    else:
        out.append(f"attention: naive MLA over fresh prompts prefilled in chunks of {setup.attn_chunk} tokens, "
                   f"each chunk one forward_step over the prompt's pages (later slots masked); roofline counts "
                   f"causal model FLOPs")
        out.append(f"DeepSeek's 9.2k input tok/s per GPU includes {CACHE_HIT:.1%} on-disk cache hits "
                   f"(~{PUBLISHED['prefill'] * (1 - CACHE_HIT):,.0f} computed tok/s); every token here is computed")
    return out


def kernels(setup: Setup) -> dict:
    """The kernels the step runs: decode's or prefill's attention, the FP8 GEMMs."""
    k = setup.kernels
    return {"attention": k.attention_decode if setup.phase == "decode" else k.attention_prefill, "gemm": k.gemm,
            "expert_dtype": "fp8" if setup.quantization == "fp8" else "bf16"}


def expected_tokens(drafts: int, acceptance: float) -> float:
    """Tokens a request gains per verify step when each draft is accepted with probability
    `acceptance` given the ones before it: the target's own token plus the accepted prefix."""
    return sum(acceptance ** i for i in range(drafts + 1))


def report(setup: Setup, times, nbytes, device, memory, extra_notes, acceptance: float = 1.0) -> dict:
    import jax

    cfg = setup.cfg
    step = statistics.median(times)
    gained = expected_tokens(setup.mtp, acceptance)  # per request and step (1 without MTP)
    tok_s = setup.batch * gained / step if setup.phase == "decode" else setup.tokens / step
    per_user = gained / step if setup.phase == "decode" else None
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
                      cache_row=cfg.kv_lora_rank + cfg.qk_rope_head_dim, mtp=setup.mtp)
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
    print(f"kernels: attention {r['kernels']['attention']}, GEMMs {r['kernels']['gemm']}")
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
    """Traces and lowers the step for `platform` from abstract shapes; prints what kernels it calls (the
    compiled program's structure: scripts/compile_gpu.py; tokamax lowers only with a GPU device at hand,
    which that script has: here pass --prefill-kernel xla)."""
    from model.kernels import lower_for_gpu
    fn, args, nbytes = build(setup, abstract=True)
    text = lower_for_gpu(fn, *args.values(), platform=platform).as_text()
    mosaic, triton = text.count("@mosaic_gpu"), text.count("xla.gpu.triton")
    print(f"lowered {setup.phase} ({setup.scale}) for {platform}: {len(text):,} chars of StableHLO, "
          f"{mosaic} Mosaic GPU and {triton} Triton (Pallas) kernel call sites, attention={kernels(setup)['attention']}, "
          f"gemm={kernels(setup)['gemm']}, weights {_si(sum(nbytes.values()), 'B')}")
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
    ap.add_argument("--deployment", help="the deployment file whose one rank this is (default: DeepSeek's, "
                    "configs/deploy/deepseek-decode-ep144.json or deepseek-prefill-ep32.json): EP size, redundant "
                    "experts, quantization, kernels, compiler options")
    ap.add_argument("--platform", choices=("gpu", "cpu"),
                    help="build the step for this platform (default: the device's; gpu: a step compiled ahead of "
                         "time on a machine without one, scripts/compile_gpu.py)")
    ap.add_argument("--attn-kernel", default="auto",
                    help="decode attention kernel by its registry name (model/kernels/registry.py): auto = the "
                         "platform's (flash_mla on GPU, xla elsewhere), xla, triton, flash_mla, *_interpret")
    ap.add_argument("--prefill-kernel", default="auto",
                    help="prefill attention: auto (tokamax on GPU, xla elsewhere), xla, tokamax, tokamax_*")
    ap.add_argument("--gemm", default="auto",
                    help="FP8 GEMMs: auto (mosaic_fp8 on GPU, xla elsewhere), xla, mosaic_fp8, triton, *_interpret")
    ap.add_argument("--quantization", choices=("fp8", "none"),
                    help="fp8: DeepSeek's FP8 weights and GEMMs; none: BF16 (default: the deployment's, else fp8)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="activations, KV cache and non-FP8 weights (fp32: for comparing code paths on a CPU)")
    ap.add_argument("--mtp", type=int, default=0, metavar="K",
                    help="decode with K MTP draft tokens per request (timed next to the plain step)")
    ap.add_argument("--acceptance", type=float, default=0.85,
                    help="per-draft acceptance rate for --mtp's tokens per step (DeepSeek: 0.85-0.90)")
    ap.add_argument("--force", action="store_true", help="run --scale full on a CPU anyway")
    ap.add_argument("--check-lowering", metavar="PLATFORM", choices=("cuda", "rocm"),
                    help="lower the step for this platform from abstract shapes, then exit (no allocation)")
    ap.add_argument("--dump-hlo", metavar="FILE", help="write the compiled step's HLO text here")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def run_step(setup: Setup, args, device, stats) -> tuple[list, bool, dict, dict]:
    """Compiles and times the setup's step -> (step times, output finite, weight bytes, memory)."""
    import jax

    fn, inputs, nbytes = build(setup)
    compiled = fn.lower(*inputs.values()).compile()
    analysis = compiled.memory_analysis()
    if args.dump_hlo:
        Path(args.dump_hlo).write_text(compiled.as_text())
    times, out = time_steps(compiled, inputs, args.steps, "pool")
    memory = {"compiled_temp_bytes": getattr(analysis, "temp_size_in_bytes", None),
              "weights_bytes": sum(nbytes.values()),
              "device_peak_bytes": device_memory(device).get("peak_bytes_in_use"),
              "device_limit_bytes": stats.get("bytes_limit")}
    return times, bool(jax.numpy.isfinite(out[0]).all()), nbytes, memory


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
    if args.mtp and (args.phase != "decode" or args.mtp < 1 or not 0 <= args.acceptance <= 1):
        print("--mtp K needs --phase decode, K >= 1 and --acceptance in [0, 1].", file=sys.stderr)
        return 2
    setup = make_setup(args, device.platform)
    stats = device_memory(device)
    setup, fit_note = fit_batch(setup, stats.get("bytes_limit"), explicit=args.batch is not None)
    plain = None
    if setup.mtp:  # the plain step first, at the same batch, for the comparison
        times, _, plain_bytes, plain_memory = run_step(dataclasses.replace(setup, mtp=0), args, device, stats)
        plain = report(dataclasses.replace(setup, mtp=0), times, plain_bytes, device, plain_memory, [], 1.0)
    times, finite, nbytes, memory = run_step(setup, args, device, stats)
    result = report(setup, times, nbytes, device, memory, [fit_note] if fit_note else [], args.acceptance)
    result["finite"] = finite
    if plain is not None:
        result["speculative"] = {
            "num_tokens": setup.mtp, "acceptance": args.acceptance,
            "tokens_per_step_per_request": expected_tokens(setup.mtp, args.acceptance),
            "plain_step_ms": plain["step_ms"], "plain_tokens_per_s_per_user": plain["tokens_per_s_per_user"],
            "plain_tokens_per_s_per_gpu": plain["tokens_per_s_per_gpu"],
            "speedup_per_user": result["tokens_per_s_per_user"] / plain["tokens_per_s_per_user"]}
    if args.json:
        print(json.dumps(result))
    else:
        print_text(result)
        if plain is not None:
            sp = result["speculative"]
            print(f"MTP k={sp['num_tokens']} at acceptance {sp['acceptance']:.2f}: {sp['tokens_per_step_per_request']:.2f} "
                  f"tokens per request and step (expected, not measured); plain step {sp['plain_step_ms']:.2f} ms, "
                  f"{sp['plain_tokens_per_s_per_user']:.1f} tok/s per user -> {sp['speedup_per_user']:.2f}x per user")
        print(f"output finite: {finite}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
