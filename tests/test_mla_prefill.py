"""model/kernels/mla_prefill.py (prefill attention over a cached prefix by flash attention) and
model/kernels/registry.py (the kernels a deployment's configuration points at).

The XLA path equals the model's own attend_naive under chunked prefill's mask (queries continuing a cached
prefix; padding queries); tokamax's implementation objects with our per-query key bounds equal it (its XLA
path on CPU, its Mosaic GPU kernel on a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import ModelConfig
from model.attention import MLA, AbsorbedKV
from model.kernels import registry
from model.kernels.mla_prefill import mla_prefill
from tiny import TINY

prefill = jax.jit(mla_prefill, static_argnames=("scale", "impl"))

B, S, T = 2, 8, 24
PREFIX = np.array([0, 13])  # row 0: a fresh prompt; row 1: a chunk continuing 13 cached positions


def case(dtype=jnp.float32, seed=0):
    cfg = ModelConfig.from_json(TINY)
    mla = nnx.eval_shape(lambda: MLA(cfg, jnp.float32, nnx.Rngs(0)))  # only cfg and kv_b_proj are used
    mla.kv_b_proj.weight = nnx.Param(0.2 * jax.random.normal(jax.random.key(seed), mla.kv_b_proj.weight.shape))
    mla.absorbed = AbsorbedKV(mla.kv_b_proj, cfg)
    H, K, P, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    keys = jax.random.split(jax.random.key(seed + 1), 3)
    q_nope = jax.random.normal(keys[0], (B, S, H, K), dtype)
    q_pe = jax.random.normal(keys[1], (B, S, H, P), dtype)
    rows = jax.random.normal(keys[2], (B, T, R + P), dtype)
    positions = jnp.asarray(PREFIX[:, None] + np.arange(S)[None], jnp.int32).at[0, -2:].set(-1)  # 2 padding
    return mla, q_nope, q_pe, rows, positions


def kv_b_halves(mla):
    """kv_b_proj's key and value halves per head: [H, K, R], [H, V, R]."""
    cfg = mla.cfg
    w = mla.kv_b_proj.weight[...].reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
    return w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]


def test_xla_equals_model_attend_naive_over_a_cached_prefix():
    mla, q_nope, q_pe, rows, positions = case()
    w_k, w_v = kv_b_halves(mla)
    got = prefill(q_nope, q_pe, rows, w_k, w_v, positions, scale=mla.cfg.softmax_scale)
    mask = jnp.arange(T)[None, None, :] <= positions[:, :, None]  # chunked prefill's mask [B, S, T]
    graphdef, state = nnx.split(mla)
    want = jax.jit(lambda state, *a: nnx.merge(graphdef, state).attend_naive(*a))(state, q_nope, q_pe, rows, mask)
    real = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, rtol=2e-5)
    assert np.isfinite(np.asarray(got)).all()  # padding queries too
    # the prefix matters: row 1's first query sees 14 keys, not 1
    alone = prefill(q_nope, q_pe, rows, w_k, w_v, positions - jnp.asarray(PREFIX)[:, None], scale=mla.cfg.softmax_scale)
    assert not np.allclose(np.asarray(alone[1, 0]), np.asarray(got[1, 0]), atol=1e-3)


def test_tokamax_with_per_query_key_bounds_equals_xla():
    """tokamax's own XLA implementation through the same wiring as its GPU kernels (Mask(k_end=...))."""
    mla, q_nope, q_pe, rows, positions = case(seed=2)
    w_k, w_v = kv_b_halves(mla)
    args = (q_nope, q_pe, rows, w_k, w_v, positions)
    np.testing.assert_allclose(np.asarray(prefill(*args, scale=mla.cfg.softmax_scale, impl="tokamax_xla")),
                               np.asarray(prefill(*args, scale=mla.cfg.softmax_scale)), atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="tokamax's Mosaic GPU flash attention needs a GPU")
def test_tokamax_mosaic_on_gpu():
    rng = np.random.default_rng(0)
    Bg, Sg, Tg, H, K, P, V, R = 2, 512, 1536, 16, 128, 64, 128, 512
    cast = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    positions = jnp.asarray(np.array([0, 1024])[:, None] + np.arange(Sg)[None], jnp.int32)
    args = (cast(Bg, Sg, H, K), cast(Bg, Sg, H, P), cast(Bg, Tg, R + P), cast(H, K, R) * 0.05, cast(H, V, R) * 0.05,
            positions)
    got = np.asarray(prefill(*args, scale=192 ** -0.5, impl="tokamax"), np.float32)
    want = np.asarray(prefill(*args, scale=192 ** -0.5), np.float32)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


def test_registry_names_and_defaults():
    """One registry: every op has its XLA reference; "auto" is the platform's choice, resolved once with
    every name checked; a kernel that cannot take a call's shape hands it to the reference."""
    from sharding.kernels import Kernels
    assert all("xla" in names for names in (registry.ATTENTION_DECODE, registry.ATTENTION_PREFILL, registry.GEMMS))
    assert registry.resolve(Kernels(), "cpu") == Kernels("xla", "xla", "xla", "padded")
    gpu = registry.resolve(Kernels(attention_prefill="xla"), "gpu", device=type("D", (), {"core_count": 132})())
    assert gpu == Kernels("flash_mla", "xla", "mosaic_fp8", "ragged", sms=132)
    assert registry.decode_parts(132, 128) == 66 and registry.decode_parts(132, 16) == 132
    with pytest.raises(ValueError, match="kernels.attention_decode 'flashmla' is not one of"):
        registry.resolve(Kernels(attention_decode="flashmla"), "gpu")
    # shape rules: flash_mla needs a 128-multiple latent, the Mosaic GEMMs FP8 weights with 16-byte TMA rows
    assert registry.decode_attention("flash_mla", rank=32, rope=16, block_size=16, dtype=jnp.bfloat16)[0] == "xla"
    assert registry.decode_attention("flash_mla", rank=512, rope=64, block_size=64, dtype=jnp.bfloat16)[0] == "flash_mla"
    assert registry.gemm("mosaic_fp8", "dense", fp8=True, n=576, k=7168) is registry.GEMMS["mosaic_fp8"]["dense"]
    assert registry.gemm("mosaic_fp8", "masked", fp8=False, n=576, k=7168) is registry.GEMMS["xla"]["masked"]
    assert registry.gemm("triton", "masked", fp8=True, n=128, k=128) is registry.GEMMS["xla"]["masked"]
    # one decode signature for every name: the XLA entry ignores the plan the kernel needs
    ql = jnp.ones((1, 2, 4)), jnp.ones((1, 2, 2))
    pool, table, lengths = jnp.ones((3, 16, 6)), jnp.zeros((1, 2), jnp.int32), jnp.asarray([5], jnp.int32)
    out = registry.ATTENTION_DECODE["xla"](*ql, pool, table, lengths, 0.1, plan=None)
    np.testing.assert_allclose(out, 1.0)  # every cached latent is 1: so is the context
