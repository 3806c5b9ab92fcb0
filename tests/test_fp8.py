"""Quantization "fp8", as DeepSeek serves: each FP8 GEMM against a numpy reading of the semantics,
the expert FFN with and without expert-parallel dispatch in front, FP8 weights held on device,
and a random checkpoint's logits against an FP8-numerics reference built with transformers."""

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from hf_reference import hf_logits, make_checkpoint, resave_fp8, tiny_config
from model import DeepseekV3
from model.experts import ExpertWeights, grouped_ffn, layout_gemm
from model.kernels import registry
from model import ModelConfig
from model.quant import (FP8, dequantize_weight, fp8_grouped_matmul, fp8_masked_matmul, fp8_matmul, held_scale_shape,
                         hold_scales, quantize_activations, quantize_blocks, real_scales)
from sharding import make_mesh
from sharding.deployment import Deployment
from model.ep import ep_routed_experts
from sharding.ep import EPConfig

ROOT_MODEL = "models/jaxseek-tiny"


# ---- numpy: the semantics, read plainly -------------------------------------------------------------

def np_quantize(x):
    """1x128 blocks along the last axis: scale = amax / 448, x_q = e4m3(x / scale)."""
    K = x.shape[-1]
    q, s = np.zeros(x.shape, ml_dtypes.float8_e4m3fn), np.ones((*x.shape[:-1], math.ceil(K / 128)), np.float32)
    for b in range(s.shape[-1]):
        blk = x[..., b * 128:(b + 1) * 128].astype(np.float32)
        amax = np.abs(blk).max(-1)
        s[..., b] = np.where(amax > 0, amax / 448.0, 1.0)
        q[..., b * 128:(b + 1) * 128] = (blk / s[..., b:b + 1]).astype(ml_dtypes.float8_e4m3fn)
    return q, s


def np_fp8_gemm(x_q, x_s, w_q, w_s):
    """[M, K] x [N, K] -> [M, N]: per 128-wide K block b, (x_q . w_q) * s_x * s_w, summed in float32."""
    M, K = x_q.shape
    N = w_q.shape[0]
    out = np.zeros((M, N), np.float32)
    for b in range(math.ceil(K / 128)):
        cols = slice(b * 128, (b + 1) * 128)
        part = x_q[:, cols].astype(np.float32) @ w_q[:, cols].astype(np.float32).T
        out += part * x_s[:, b][:, None] * w_s[np.arange(N) // 128, b][None, :]
    return out


def near_rounding_edge(x, rel=2e-6):
    """[..., K] -> [...]: whether any element of a row sits within `rel` of an e4m3 rounding edge once scaled,
    so float32 noise upstream (summation order, silu's formula) may tip it one e4m3 step."""
    _, s = np_quantize(x)
    v = x.astype(np.float64) / np.repeat(s, 128, axis=-1)[..., :x.shape[-1]]
    e4m3 = lambda a: a.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return ((e4m3(v * (1 + rel)) != e4m3(v)) | (e4m3(v * (1 - rel)) != e4m3(v))).any(-1)


def np_expert(x, w):
    """One expert, DeepSeek's Expert.forward with FP8 linears: w = (gate, up, down) as (e4m3, scale).
    Also returns, per row, whether its hidden activation sits on an e4m3 rounding edge (near_rounding_edge)."""
    xq = np_quantize(x)
    gate, up = np_fp8_gemm(*xq, *w[0]), np_fp8_gemm(*xq, *w[1])
    h = gate * 0.5 * (1 + np.tanh(gate / 2)) * up  # silu, without exp's overflow
    return np_fp8_gemm(*np_quantize(h), *w[2]), near_rounding_edge(h)


def close(got, want):
    """Equal to float32 rounding: summation order differs, each of the K/128 block partials rounds."""
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def close_but_edges(got, want, edge):
    """close() on every row but those whose hidden activation sits on an e4m3 rounding edge (edge [M]): there one
    element may round one e4m3 step (1/16 relative) the other way, so the row is held to 1% of its magnitude."""
    got = np.asarray(got, np.float32)
    assert edge.mean() < 0.1, f"{edge.sum()} of {len(edge)} rows on a rounding edge: the case tests nothing"
    close(got[~edge], want[~edge])
    for r in np.flatnonzero(edge):
        np.testing.assert_allclose(got[r], want[r], atol=1e-2 * np.abs(want[r]).max())


def fp8_weights(rng, shape):
    return quantize_blocks(rng.normal(size=shape).astype(np.float32) * np.linspace(0.5, 2, shape[-1]))


def activations(rng, shape):
    return rng.normal(size=shape).astype(np.float32) * np.linspace(0.1, 10, shape[-1])  # block amaxes differ


# ---- the GEMMs --------------------------------------------------------------------------------------

def test_activation_quantiser_is_one_scale_per_token_per_128_channels():
    x = activations(np.random.default_rng(0), (7, 300))
    q, s = jax.jit(quantize_activations)(x)
    want_q, want_s = np_quantize(x)
    assert q.dtype == FP8 and s.shape == (7, 3)
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-6)
    # XLA may divide by multiplying with the reciprocal: an exact rounding tie may tip one e4m3 step
    assert (np.asarray(q, np.float32) != want_q.astype(np.float32)).mean() < 1e-3


def test_dense_fp8_matmul_equals_numpy_per_block_semantics():
    rng = np.random.default_rng(1)
    x_q, x_s = np_quantize(activations(rng, (37, 300)))  # K = 300: two whole blocks and a ragged one
    w_q, w_s = fp8_weights(rng, (200, 300))  # N = 200: a ragged block of rows
    got = jax.jit(fp8_matmul, static_argnums=4)(x_q, x_s, w_q, w_s, jnp.float32)
    close(got, np_fp8_gemm(x_q, x_s, w_q, w_s))
    # the scales as held on device (K-block axis padded to a 256-byte multiple, the padding never read)
    held = hold_scales(w_s)
    assert held.shape == held_scale_shape(w_q.shape) == (2, 32) and np.array_equal(real_scales(held, 300), w_s)
    np.testing.assert_array_equal(jax.jit(fp8_matmul, static_argnums=4)(x_q, x_s, w_q, held, jnp.float32), got)
    with pytest.raises(ValueError, match="one scale per 128x128 block"):
        fp8_matmul(x_q, x_s, w_q, held[:, :5], jnp.float32)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the GPU's own FP8 GEMM path (CPU sibling above)")
def test_fp8_gemms_on_gpu_match_numpy():
    rng = np.random.default_rng(6)
    x_q, x_s = np_quantize(activations(rng, (64, 512)))
    w_q, w_s = fp8_weights(rng, (256, 512))
    dense = registry.gemm("mosaic_fp8", "dense", fp8=True, n=256, k=512)
    got = np.asarray(jax.jit(lambda x_q, x_s, w, s: dense((x_q, x_s), w, s, jnp.float32))(x_q, x_s, w_q, w_s))
    want = np_fp8_gemm(x_q, x_s, w_q, w_s)
    close(got, want)
    sizes = jnp.asarray([20, 0, 30, 14])
    w3 = fp8_weights(rng, (4, 256, 512))
    got = np.asarray(jax.jit(lambda x_q, x_s, w, s, n: layout_gemm("contiguous", (x_q, x_s), w, s, n, jnp.float32,
                                                                   "mosaic_fp8"))(x_q, x_s, *w3, sizes))
    start = 0
    for g, n in enumerate([20, 0, 30, 14]):  # the Mosaic FP8 x FP8 grouped GEMM
        if n:
            ref = np_fp8_gemm(x_q[start:start + n], x_s[start:start + n], w3[0][g], w3[1][g])
            close(got[start:start + n], ref)
        start += n


def test_gemms_run_per_rank_on_their_own_rows():
    """How a GEMM kernel runs outside the EP stages (registry.rows_per_rank; gemm_per_rank picks it for
    every kernel: XLA cannot partition a custom call and would gather every rank's rows to each): one
    shard_map over a dp=8 mesh, each rank on its own rows with the weights whole, equal to the GEMM over
    the whole batch; in the masked layout each rank gets its share of a group's count. (The GEMM here is
    the XLA reference: the Mosaic interpreter cannot run on several devices at once; the kernel equals it
    per call above, and tests/gpu_compile checks the compiled 8-GPU program gathers no rows.)"""
    ranks = registry.Ranks(make_mesh(8), "dp")
    rng = np.random.default_rng(11)
    x_q, x_s = np_quantize(activations(rng, (16, 256)))
    w_q, w_s = fp8_weights(rng, (128, 256))
    w_s = hold_scales(w_s)
    assert registry.gemm_per_rank(ranks, "xla", "dense", fp8=True, n=128, k=256) is registry.GEMMS["xla"]["dense"]
    dense = registry.rows_per_rank(ranks, registry.GEMMS["xla"]["dense"], "dense")
    run = jax.jit(lambda x_q, x_s, w, s: dense((x_q, x_s), w, s, jnp.float32))
    assert "shard_map" in str(jax.make_jaxpr(run)(x_q, x_s, w_q, w_s))
    np.testing.assert_array_equal(run(x_q, x_s, w_q, w_s), fp8_matmul(x_q, x_s, w_q, w_s, jnp.float32))
    masked = registry.rows_per_rank(ranks, registry.GEMMS["xla"]["masked"], "masked")
    xg, sg = x_q.reshape(2, 8, 256), x_s.reshape(2, 8, 2)
    counts = np.array([3, 8], np.int32)  # group 0: rows 3.. unused (ranks 1-7 hold none of its used rows)
    got = jax.jit(lambda x, s, w, ws, c: masked((x, s), w, ws, c, jnp.float32))(
        xg, sg, np.stack([w_q, w_q]), np.stack([w_s, w_s]), counts)
    want = fp8_masked_matmul(xg, sg, np.stack([w_q, w_q]), np.stack([w_s, w_s]), counts, jnp.float32)
    close(got, np.asarray(want))  # (XLA:CPU may order the float32 sums differently per shape)
    assert not np.any(np.asarray(got)[0, 3:]) and np.all(np.any(np.asarray(got)[1] != 0, axis=-1))


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_grouped_fp8_matmul_contiguous_layout_equals_numpy(impl):
    """reference: fp8_grouped_matmul; interpret: the GEMM the experts run on GPU (model.experts.layout_gemm
    under kernels.gemm mosaic_fp8: the Mosaic FP8 kernel, run by its interpreter here)."""
    rng = np.random.default_rng(2)
    sizes = [10, 0, 25, 9]  # an empty group; 6 rows past the last group
    x_q, x_s = np_quantize(activations(rng, (50, 256)))
    w_q, w_s = fp8_weights(rng, (4, 160, 256))
    if impl == "reference":
        got = jax.jit(lambda *a: fp8_grouped_matmul(*a, jnp.float32))(x_q, x_s, w_q, w_s, jnp.asarray(sizes))
    else:
        got = jax.jit(lambda x_q, x_s, w_q, w_s, n: layout_gemm("contiguous", (x_q, x_s), w_q, w_s, n, jnp.float32,
                                                                 "mosaic_fp8_interpret"))(x_q, x_s, w_q, w_s,
                                                                                          jnp.asarray(sizes))
    want = np.zeros((50, 160), np.float32)
    start = 0
    for g, n in enumerate(sizes):
        want[start:start + n] = np_fp8_gemm(x_q[start:start + n], x_s[start:start + n], w_q[g], w_s[g])
        start += n
    close(got, want)


def test_masked_fp8_matmul_equals_numpy_and_zeroes_unused_rows():
    rng = np.random.default_rng(3)
    counts = [16, 5, 0]
    x_q, x_s = np_quantize(activations(rng, (3, 16, 300)))
    w_q, w_s = fp8_weights(rng, (3, 130, 300))
    got = np.asarray(jax.jit(fp8_masked_matmul, static_argnums=5)(x_q, x_s, w_q, w_s, jnp.asarray(counts),
                                                                  jnp.float32))
    for g, n in enumerate(counts):
        if n:
            close(got[g, :n], np_fp8_gemm(x_q[g, :n], x_s[g, :n], w_q[g], w_s[g]))
        assert not got[g, n:].any()


# ---- the expert FFN: one device (every layout) and behind the EP8 dispatch ---------------------------

@pytest.fixture(scope="module")
def moe_case():
    """16 experts (24 physical slots: 8 replicas) of D=256 -> F=160, 64 tokens choosing 4 each."""
    rng = np.random.default_rng(4)
    E, P, D, F, N, k = 16, 24, 256, 160, 64, 4
    logical = [tuple(fp8_weights(rng, s)) for s in ((E, F, D), (E, F, D), (E, D, F))]
    phy2log = np.arange(P) % E
    experts = ExpertWeights(*(w[0][phy2log] for w in logical), *(w[1][phy2log] for w in logical))
    x = activations(rng, (N, D)) / 4
    ids = np.stack([rng.choice(P, k, replace=False) for _ in range(N)]).astype(np.int32)
    weights = rng.random((N, k)).astype(np.float32)
    want, edge = np.zeros((N, D), np.float32), np.zeros(N, bool)
    for t in range(N):
        for j in range(k):
            e = phy2log[ids[t, j]]
            w = [(logical[i][0][e], logical[i][1][e]) for i in range(3)]
            out, on_edge = np_expert(x[t:t + 1], w)
            want[t] += weights[t, j] * out[0]
            edge[t] |= on_edge[0]
    return x, ids, weights, experts, (want, edge)


@pytest.mark.parametrize("layout", ["contiguous", "masked", "tiles"])
def test_expert_ffn_equals_numpy_in_every_layout(moe_case, layout):
    x, ids, weights, experts, want = moe_case
    run = jax.jit(lambda x, e: grouped_ffn(x, ids, weights, e, layout, capacity=64, tile=8, gemm="xla")[0])
    close_but_edges(run(x, experts), *want)


def test_expert_ffn_through_the_mosaic_kernel_equals_the_reference():
    """The GPU's decode layout of the routed experts (masked: a capacity bucket per expert, rounded up to the
    kernel's row tile) through the Mosaic FP8 grouped GEMM (kernels.gemm mosaic_fp8, its interpreter here):
    the XLA reference's output. (The contiguous layout's kernel: test_grouped_fp8_matmul_contiguous_layout_...)"""
    rng = np.random.default_rng(9)
    ws = [fp8_weights(rng, s) for s in ((2, 128, 256), (2, 128, 256), (2, 256, 128))]
    experts = ExpertWeights(*(w[0] for w in ws), *(w[1] for w in ws))
    x, ids = activations(rng, (6, 256)) / 4, np.array([[0, 1], [1, -1], [0, -1], [1, 0], [0, 1], [-1, -1]], np.int32)
    weights = rng.random((6, 2)).astype(np.float32)
    run = jax.jit(lambda x, e, gemm: grouped_ffn(x, ids, weights, e, "masked", gemm=gemm)[0], static_argnums=2)
    close(run(x, experts, "mosaic_fp8_interpret"), np.asarray(run(x, experts, "xla")))


def test_expert_ffn_behind_fp8_dispatch_equals_numpy(moe_case):
    """EP8: the dispatch quantises each row once, sends e4m3 + scales, and the experts use them as
    they arrive; combined in float32 it is the per-block semantics, token by token."""
    x, ids, weights, experts, want = moe_case
    ep = EPConfig(mesh=make_mesh(8), combine_dtype="fp32")  # dispatch "auto": FP8 for FP8 experts
    run = jax.jit(lambda x, e: ep_routed_experts(x, ids, weights, jnp.ones(len(x), bool), e, ep))
    out, stats = run(x, experts)
    close_but_edges(out, *want)
    assert int(stats["expert_load"].sum()) == ids.size and not bool(stats["overflow"])


# ---- the model ---------------------------------------------------------------------------------------

def test_fp8_weights_stay_fp8_on_device_and_cost_no_more_than_the_checkpoint():
    from pathlib import Path
    net = DeepseekV3.from_pretrained(ROOT_MODEL, quantization="fp8")
    attn, moe = net.moe_layers.self_attn, net.moe_layers.mlp
    for linear in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj,
                   moe.shared_experts.down_proj, net.dense_layers.mlp.gate_proj, moe.experts.up_proj, net.mtp.eh_proj):
        w, s = linear.weight[...], linear.weight_scale_inv[...]
        assert w.dtype == FP8 and s.dtype == jnp.float32
        assert s.shape == held_scale_shape(w.shape) and s.shape[-2] == math.ceil(w.shape[-2] / 128)
        assert s.shape[-1] >= math.ceil(w.shape[-1] / 128) and (4 * math.prod(s.shape[-2:])) % 256 == 0
    for w in (net.embed_tokens.weight, net.lm_head.weight, moe.gate.weight, net.norm.weight):
        assert w[...].dtype == jnp.float32
    files = sum(f.stat().st_size for f in Path(ROOT_MODEL).glob("*.safetensors"))
    default = DeepseekV3.from_pretrained(ROOT_MODEL)  # an FP8 checkpoint; on a CPU the default is none
    assert default.quantization == ("fp8" if jax.default_backend() == "gpu" else "none")
    none = default.parameter_bytes if default.quantization == "none" else None
    print(f"parameter bytes: fp8 {net.parameter_bytes:,}, {default.quantization} {default.parameter_bytes:,}, "
          f"checkpoint files {files:,}")
    assert net.parameter_bytes <= 1.15 * files and (none is None or none > 2 * net.parameter_bytes)


def test_live_eplb_moves_fp8_experts_with_their_scales(tmp_path):
    from model.moe import move_experts
    from sharding.eplb import rebalance_experts
    # the deployment asks for fp8 (as a deployment file's "quantization" does)
    net = DeepseekV3.from_pretrained(ROOT_MODEL, deployment=Deployment(name="ep8", dp=8, redundant_experts=8,
                                                                       quantization="fp8"))
    assert net.quantization == "fp8"
    mlp = net.moe_layers.mlp
    before = {n: np.asarray(getattr(mlp.experts.down_proj, n)[...]) for n in ("weight", "weight_scale_inv")}
    first = np.asarray(mlp.log2phy[...])[:, :, 0]  # [L, E]: a slot holding each logical expert now
    load = np.random.default_rng(0).zipf(1.5, (mlp.phy2log.shape[0], 16)).astype(np.float64)
    new = rebalance_experts(load, 24, net.config.n_group, 1, 8)
    move_experts(net.moe_layers, *new)
    for name, old in before.items():
        moved = np.asarray(getattr(mlp.experts.down_proj, name)[...])
        assert moved.dtype == old.dtype and moved.shape == old.shape
        want = np.take_along_axis(old, np.take_along_axis(first, new[0], 1)[:, :, None, None], 1)
        np.testing.assert_array_equal(moved.view(np.uint8), want.view(np.uint8))
    assert not np.array_equal(new[0], np.asarray(np.arange(24) % 16)[None].repeat(len(new[0]), 0))


def test_orbax_round_trip_in_fp8_and_into_none(tmp_path):
    net = DeepseekV3.from_pretrained(ROOT_MODEL, quantization="fp8")
    net.save(tmp_path / "orbax")
    back = DeepseekV3.from_pretrained(tmp_path / "orbax", quantization="fp8")
    for a, b in ((net.moe_layers.mlp.experts.gate_proj.weight, back.moe_layers.mlp.experts.gate_proj.weight),
                 (net.moe_layers.self_attn.o_proj.weight_scale_inv, back.moe_layers.self_attn.o_proj.weight_scale_inv)):
        assert a[...].dtype == b[...].dtype
        np.testing.assert_array_equal(np.asarray(a[...]).view(np.uint8), np.asarray(b[...]).view(np.uint8))
    dense = DeepseekV3.from_pretrained(tmp_path / "orbax", quantization="none")  # dequantised on device
    reference = DeepseekV3.from_pretrained(ROOT_MODEL, quantization="none")
    np.testing.assert_array_equal(np.asarray(dense.moe_layers.mlp.experts.gate_proj.weight[...]),
                                  np.asarray(reference.moe_layers.mlp.experts.gate_proj.weight[...]))


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """x with each 1x128 block through e4m3 at scale amax / 448 and back (torch: independent of ours)."""
    K = x.shape[-1]
    nb = -(-K // 128)
    blocks = torch.nn.functional.pad(x.float(), (0, nb * 128 - K)).reshape(*x.shape[:-1], nb, 128)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (blocks / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    return q.reshape(*x.shape[:-1], nb * 128)[..., :K].to(x.dtype)


def fp8_numerics(model):
    """transformers' model with every FP8 linear's input quantised 1x128: attention projections, dense
    MLP and shared experts through forward pre-hooks, the routed experts (3-D parameters) re-run."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
    model = copy.deepcopy(model)

    def experts_forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e in range(self.num_experts):
            tok, pos = torch.where(top_k_index == e)
            gate, up = torch.nn.functional.linear(fake_quantize(hidden[tok]), self.gate_up_proj[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(fake_quantize(self.act_fn(gate) * up), self.down_proj[e])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("_proj", "_proj_with_mqa")):
            module.register_forward_pre_hook(lambda m, args: (fake_quantize(args[0]),))
        elif isinstance(module, DeepseekV3Experts):
            module.forward = experts_forward.__get__(module)
    return model


def test_random_checkpoint_follows_fp8_numerics_on_one_device_and_ep8(tmp_path):
    """On a random model (not the repo's: e4m3 rounding flips cascade, so no tight bound exists) fp8
    mode's logits are far closer to transformers run with FP8 numerics than to the dequantised
    model, and EP8 (FP8 dispatch, fp32 combine, redundant experts, two-batch overlap) stays as close."""
    cfg = tiny_config(hidden_size=256, intermediate_size=384, moe_intermediate_size=160, kv_lora_rank=160,
                      q_lora_rank=192)  # two 128 blocks, and ragged ones
    make_checkpoint(tmp_path / "hf", cfg, seed=3)
    dequantised = resave_fp8(tmp_path / "hf", tmp_path / "fp8", (128, 128))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (16, 12)).astype(np.int32)  # 2 rows a rank
    deq, ref = hf_logits(dequantised, tokens), hf_logits(fp8_numerics(dequantised), tokens)
    one = np.asarray(DeepseekV3.from_pretrained(tmp_path / "fp8", quantization="fp8")(tokens))
    ep8 = DeepseekV3.from_pretrained(tmp_path / "fp8", quantization="fp8", deployment=Deployment(
        name="ep8", dp=8, redundant_experts=8, combine_dtype="fp32", overlap="two_batch"))
    assert ep8.ep.dispatch_dtype == "auto" and ep8.n_physical_experts == 16
    ep8 = np.asarray(ep8(tokens))

    def mean(a, b):
        return float(np.abs(a - b).mean())
    print(f"mean |logit| {np.abs(deq).mean():.3f}; FP8 numerics vs dequantised {mean(ref, deq):.4f}; one device: "
          f"{mean(one, ref):.2e} from FP8 numerics, {mean(one, deq):.4f} from dequantised; EP8 {mean(ep8, ref):.2e}")
    assert mean(ref, deq) > 0.05 * np.abs(deq).mean()  # FP8 numerics really differ from the dequantised model
    assert mean(one, ref) < 0.05 * mean(one, deq)
    assert mean(ep8, ref) < 0.05 * mean(ep8, deq) and mean(ep8, ref) <= 2 * mean(one, ref)


# ---- the absorbed MLA's per-head FP8 GEMMs (kv_b_proj's halves, made once at load) --------------------

def test_absorbed_halves_of_an_fp8_kv_b_proj_are_its_own_blocks():
    """With K = V = 128 (DeepSeek's) each head's halves are whole 128x128 blocks: the key half transposed and
    the value half are kv_b_proj's own e4m3 values and scales moved, nothing requantised."""
    from model.attention import absorbed_weights
    cfg = ModelConfig.from_json("configs/tiny/config.json").replace(qk_nope_head_dim=128, v_head_dim=128,
                                                                    kv_lora_rank=256)
    H, R = cfg.num_attention_heads, cfg.kv_lora_rank
    w, s = fp8_weights(np.random.default_rng(7), (H * 256, R))
    uk, uk_s, uv, uv_s = jax.jit(lambda w, s: absorbed_weights(w, s, cfg))(w, s)
    real = np.asarray(dequantize_weight(jnp.asarray(w), jnp.asarray(s))).reshape(H, 256, R)
    assert uk.dtype == uv.dtype == FP8 and uk.shape == (H, R, 128) and uv.shape == (H, 128, R)
    np.testing.assert_array_equal(np.asarray(dequantize_weight(uk, uk_s)), real[:, :128].transpose(0, 2, 1))
    np.testing.assert_array_equal(np.asarray(dequantize_weight(uv, uv_s)), real[:, 128:])


def test_absorbed_per_head_gemms_through_the_mosaic_kernel_equal_the_reference():
    """MLA.absorb_query / absorb_output (the masked layout, one group per head) with kernels.gemm mosaic_fp8
    (its interpreter here) equal the XLA reference, and the FP8 semantics read with numpy."""
    from flax import nnx
    from model.attention import MLA
    cfg = ModelConfig.from_json("configs/tiny/config.json").replace(qk_nope_head_dim=128, v_head_dim=128,
                                                                    kv_lora_rank=128, num_attention_heads=2)
    mla = MLA(cfg, jnp.float32, nnx.Rngs(3), fp8=True)
    rng = np.random.default_rng(8)
    q_nope = jnp.asarray(activations(rng, (5, 2, 128)))  # [B, H, K]
    context = jnp.asarray(activations(rng, (5, 2, 128)))  # [B, H, R]
    graphdef, state = nnx.split(mla)

    def run(gemm):
        def f(state, q, c):
            m = nnx.merge(graphdef, state)
            m.gemm = gemm
            return m.absorb_query(q), m.absorb_output(c)
        return [np.asarray(a) for a in jax.jit(f)(state, q_nope, context)]

    (q_ref, o_ref), (q_kernel, o_kernel) = run("xla"), run("mosaic_fp8_interpret")
    close(q_kernel, q_ref)
    close(o_kernel, o_ref)
    a = mla.absorbed
    for h in range(2):
        close(q_ref[:, h], np_fp8_gemm(*np_quantize(np.asarray(q_nope[:, h])), np.asarray(a.w_uk_t[...][h]),
                                       np.asarray(a.w_uk_t_scale[...][h])))
