"""model.kernels.mla_decode: the Pallas MLA decode kernel (interpret mode on CPU) against an
independent numpy reference, the XLA path and the model's own attend_absorbed; masking of junk;
Triton lowering at DeepSeek-V3 shapes; bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import ModelConfig
from model.attention import MLA, AbsorbedKV
from model.kernels import lower_for_gpu
from model.kernels.mla_decode import mla_decode
from tiny import TINY

B, H, R, P, BS, NB = 3, 8, 64, 16, 8, 12
LENGTHS = np.array([1, 13, 30], np.int32)  # 1, 2 and 4 blocks: a lone position, a partial block, a nearly full row
MB = 4
SCALE = 0.11


def _case(dtype, seed=0, junk=False):
    """Random queries, a pool whose used blocks are scattered over it, and the page table.
    junk: NaN in every pool value a row must not see, garbage ids in unused page-table entries."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((NB, BS, R + P)).astype(np.float32)
    blocks = rng.permutation(NB)[:B * MB].reshape(B, MB)  # non-contiguous, out of order
    table = blocks.astype(np.int32)
    if junk:
        used = np.zeros((NB, BS), bool)
        for b, n in enumerate(LENGTHS):
            for t in range(n):
                used[table[b, t // BS], t % BS] = True
        pool[~used] = np.nan
        for b, n in enumerate(LENGTHS):
            table[b, -(-n // BS):] = [2**30, -1, 7 * NB, 2**31 - 1][:MB - (-(-n // BS))]
    q_latent = rng.standard_normal((B, H, R)).astype(np.float32)
    q_pe = rng.standard_normal((B, H, P)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q_latent), cast(q_pe), cast(pool), jnp.asarray(table), jnp.asarray(LENGTHS)


def _reference(q_latent, q_pe, pool, table, lengths, scale):
    """Plain numpy, float64: gather each row's positions one by one, masked softmax, context."""
    q_latent, q_pe, pool = (np.asarray(x, np.float64) for x in (q_latent, q_pe, pool))
    out = np.zeros(q_latent.shape)
    for b, n in enumerate(np.asarray(lengths)):
        rows = np.stack([pool[int(table[b, t // BS]), t % BS] for t in range(n)])  # [n, C]
        latent, k_pe = rows[:, :R], rows[:, R:]
        scores = (q_latent[b] @ latent.T + q_pe[b] @ k_pe.T) * scale  # [H, n]
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[b] = (probs / probs.sum(-1, keepdims=True)) @ latent
    return out


# f32: all paths sum the same terms in different orders; observed ~3e-7 on |context| <~ 2.5.
# bf16: the inputs are exact bf16 values everywhere (the reference is float64 on them), but the kernel,
# like attend_absorbed, rounds probabilities to bf16 before the context dot (2^-9 relative each) and
# the result to bf16 (half an ulp: 2^-9 relative, 0.0078 at 2.5); observed ~3.5e-3, allowed 1e-2 + 1%.
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype,num_splits,block_h", [(jnp.float32, 1, 16), (jnp.float32, 3, 4),
                                                      (jnp.bfloat16, 1, 4), (jnp.bfloat16, 3, 16)])
def test_pallas_matches_xla_and_numpy_reference(dtype, num_splits, block_h):
    # block_h 16 > H pads heads; block_h 4 makes 2 head groups; 3 splits of 2 pages leave some splits empty
    args = _case(dtype)
    kw = dict(block_size=BS, block_h=block_h, num_splits=num_splits)
    got = mla_decode(*args, SCALE, impl="pallas", interpret=True, **kw)
    xla = mla_decode(*args, SCALE, impl="xla", **kw)
    assert got.shape == (B, H, R) and got.dtype == dtype and xla.dtype == dtype
    want = _reference(*args, SCALE)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(xla, np.float64), want, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(xla, np.float64), **TOL[dtype])
    # a length-1 row attends to its single position only: context == that latent exactly (f32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got[0], np.broadcast_to(args[2][args[3][0, 0], 0, :R], (H, R)), atol=1e-6)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_junk_past_length_and_in_unused_table_entries_is_ignored(impl):
    clean, dirty = _case(jnp.float32), _case(jnp.float32, junk=True)
    pool, table = np.asarray(dirty[2]), np.asarray(dirty[3])
    assert np.isnan(pool[table[1, 1], 13 % BS:]).all() and table[0, 1] == 2**30  # the junk is really there
    kw = dict(block_size=BS, impl=impl, interpret=True, num_splits=2)
    got, want = mla_decode(*dirty, SCALE, **kw), mla_decode(*clean, SCALE, **kw)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_array_equal(got, want)  # masked, not merely small: bit-identical


def test_context_through_w_v_equals_model_attend_absorbed():
    """The model's own math (YaRN-scaled softmax_scale, q_nope @ w_k, context @ w_v) on the gathered rows."""
    cfg = dataclasses.replace(ModelConfig.from_json(TINY), kv_lora_rank=R)
    assert cfg.softmax_scale != cfg.qk_head_dim ** -0.5  # YaRN mscale is in play
    # attend_absorbed reads only cfg and kv_b_proj: shape the module abstractly (a real init takes ~7 s
    # eagerly on CPU), then give it a concrete random kv_b_proj
    mla = nnx.eval_shape(lambda: MLA(cfg, jnp.float32, nnx.Rngs(0)))
    mla.kv_b_proj.weight = nnx.Param(0.2 * jax.random.normal(jax.random.key(0), mla.kv_b_proj.weight.shape))
    mla.absorbed = AbsorbedKV(mla.kv_b_proj, cfg)  # the absorbed form's halves, from this kv_b_proj
    w = mla.kv_b_proj.weight[...].reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
    w_k, w_v = w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]
    _, q_pe, pool, table, lengths = _case(jnp.float32, seed=1)
    q_nope = jax.random.normal(jax.random.key(1), (B, cfg.num_attention_heads, cfg.qk_nope_head_dim))
    q_pe = q_pe[:, :cfg.num_attention_heads]
    q_latent = jnp.einsum("bhk,hkr->bhr", q_nope, w_k)
    context = mla_decode(q_latent, q_pe, pool, table, lengths, cfg.softmax_scale, block_size=BS, impl="pallas",
                         interpret=True)
    rows = pool[table].reshape(B, MB * BS, R + P)  # PagedCache.read
    mask = (jnp.arange(MB * BS)[None] < lengths[:, None])[:, None]  # [B, S=1, T]
    want = mla.attend_absorbed(q_nope[:, None], q_pe[:, None], rows, mask)[:, 0]
    np.testing.assert_allclose(jnp.einsum("bhr,hvr->bhv", context, w_v), want, atol=2e-5, rtol=2e-5)


def test_auto_is_xla_on_cpu_and_works_under_jit():
    args = _case(jnp.float32)
    xla = mla_decode(*args, SCALE, block_size=BS, impl="xla")
    auto = jax.jit(lambda *a: mla_decode(*a, SCALE, block_size=BS))(*args)  # traced lengths: checks skipped
    assert jax.default_backend() == "gpu" or np.array_equal(auto, xla)
    np.testing.assert_allclose(auto, xla, atol=2e-5)


@pytest.mark.parametrize("num_splits", [None, 4])
def test_triton_lowering_at_deepseek_shapes(num_splits):
    """Lowers the compiled (non-interpret) kernel to Triton IR for CUDA: no GPU needed, catches
    non-power-of-two tensors and ops the Pallas Triton backend does not support."""
    sd = jax.ShapeDtypeStruct
    shapes = [sd((64, 128, 512), jnp.bfloat16), sd((64, 128, 64), jnp.bfloat16),
              sd((8192, 64, 576), jnp.bfloat16), sd((64, 80), jnp.int32), sd((64,), jnp.int32)]
    fn = jax.jit(lambda *a: mla_decode(*a, 0.1, block_size=64, impl="pallas", num_splits=num_splits))
    text = lower_for_gpu(fn, *shapes).as_text()
    assert "xla.gpu.triton" in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs a GPU")
def test_compiled_kernel_at_deepseek_shapes_on_gpu():
    b, h, r, p, bs, mb = 64, 128, 512, 64, 64, 80
    rng = np.random.default_rng(0)
    lengths = jnp.asarray(rng.integers(4500, mb * bs + 1, b), jnp.int32)  # ~5000 cached positions
    table = jnp.asarray(rng.permutation(b * mb + 100)[:b * mb].reshape(b, mb), jnp.int32)
    keys = jax.random.split(jax.random.key(0), 3)
    pool = jax.random.normal(keys[0], (b * mb + 100, bs, r + p), jnp.bfloat16)
    q_latent = jax.random.normal(keys[1], (b, h, r), jnp.bfloat16)
    q_pe = jax.random.normal(keys[2], (b, h, p), jnp.bfloat16)
    scale = 192 ** -0.5
    want = mla_decode(q_latent, q_pe, pool, table, lengths, scale, block_size=bs, impl="xla")
    for num_splits in (None, 4):  # None: 1 split here (64 rows x 8 head groups fill the GPU)
        got = mla_decode(q_latent, q_pe, pool, table, lengths, scale, block_size=bs, impl="pallas",
                         num_splits=num_splits)
        assert np.isfinite(np.asarray(got, np.float32)).all()
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[jnp.bfloat16])


def _bad(**change):
    q_latent, q_pe, pool, table, lengths = _case(jnp.float32)
    args = dict(q_latent=q_latent, q_pe=q_pe, pool=pool, page_table=table, lengths=lengths, scale=SCALE,
                block_size=BS, impl="pallas", interpret=True)
    args.update(change)
    return args


@pytest.mark.parametrize("change,match", [
    (dict(q_pe=jnp.zeros((B, H - 1, P))), "disagree on \\[batch, heads\\]"),
    (dict(page_table=jnp.zeros((B, NB + 1), jnp.int32)), "page table has 13 blocks per row but the pool holds only 12"),
    (dict(lengths=jnp.asarray([1, 13, MB * BS + 1], jnp.int32)), "lengths must lie in \\[1, 32\\]"),
    (dict(lengths=jnp.asarray([0, 13, 30], jnp.int32)), "lengths must lie in \\[1, 32\\]"),
    (dict(block_size=16), "block_size=16 but the pool's blocks hold 8"),
    (dict(q_pe=jnp.zeros((B, H, P + 1))), "pool width 80 is not kv_lora_rank 64 \\+ rope dim 17"),
    (dict(page_table=jnp.zeros((B + 1, MB), jnp.int32)), "must have 3 rows like q"),
    (dict(impl="triton"), "impl must be"),
    (dict(interpret=False), "needs block_size a power of two >= 16, got 8"),
])
def test_bad_input_raises_one_clear_sentence(change, match):
    with pytest.raises(ValueError, match=match) as err:
        mla_decode(**_bad(**change))
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(".")


def test_engine_decodes_through_the_kernel_path(monkeypatch):
    """The engine's decode steps through PagedCache.absorbed_context (the kernel run by the Pallas
    interpreter, per rank and per micro-batch of the five-stage overlap) give the XLA path's tokens."""
    import model.kernels.mla_decode as kernel_module
    from serving import LLM, SamplingParams
    from sharding.deployment import Deployment
    traced = []
    pallas = kernel_module._pallas
    monkeypatch.setattr(kernel_module, "_pallas", lambda *a, **k: traced.append(a[3].shape) or pallas(*a, **k))
    serving = {"prefill_tokens": [32], "prefill_rows": [4], "decode_batch": [4], "max_model_len": 64}
    prompts = ["add 12+7=", "reverse 90817=", "sort 5210=", "add 3+44=", "reverse 123=", "sort 987="]
    params = SamplingParams(max_tokens=3, ignore_eos=True)  # 2 decode steps through the interpreted kernel
    outs = {}
    for kernel in ("xla", "triton_interpret"):
        dep = Deployment(name="kernel", dp=2, overlap="five_stage", serving=serving, kernels={"attention_decode": kernel})
        llm = LLM(deployment=dep)
        outs[kernel] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["triton_interpret"] == outs["xla"] and all(len(t) == 3 for t in outs["xla"])
    # a rank's 4 rows (the dense layer) and each micro-batch's 2 (the MoE layers under overlap), each
    # row's 1 + k query positions (its last token and k MTP drafts, on by default) as rows of the kernel
    S = 1 + llm.engine.drafts
    assert S == 2 and {table[0] for table in traced} == {4 * S, 2 * S}


def test_flash_mla_in_the_model_step_equals_the_gathered_rows():
    """MLA.attend_in_cache with the deployment's flash_mla (its Mosaic GPU interpreter here) over a paged
    bfloat16 pool, with its per-step plan (registry.decode_plan over the rows' lengths), equals
    attend_absorbed over the gathered rows: the absorbed query, the kernel, the value half after it."""
    from serving.kv_cache import PagedCache
    cfg = dataclasses.replace(ModelConfig.from_json(TINY), kv_lora_rank=128, qk_rope_head_dim=64,
                              qk_nope_head_dim=32, v_head_dim=32, num_attention_heads=2)
    mla = MLA(cfg, jnp.float32, nnx.Rngs(0))
    mla.decode_kernel, mla.sms = "flash_mla_interpret", 4  # 4 SMs: the rows' pages split in 2 parts per head block
    rng = np.random.default_rng(3)
    Bq, MBq, BSq = 3, 4, 16
    pool = jnp.asarray(rng.standard_normal((1, Bq * MBq, BSq, 192)), jnp.bfloat16)
    table = jnp.asarray(rng.permutation(Bq * MBq).reshape(Bq, MBq), jnp.int32)
    slots = jnp.asarray([[5], [63], [30]], jnp.int32)  # the new token's position per row
    q_nope = jnp.asarray(rng.standard_normal((Bq, 1, 2, 32)), jnp.float32)
    q_pe = jnp.asarray(rng.standard_normal((Bq, 1, 2, 64)), jnp.float32)
    cache = PagedCache(pool, table)
    got = jax.jit(lambda q, p, c: mla.attend_in_cache(q, p, c, jnp.int32(0), slots))(q_nope, q_pe, cache)
    rows = cache.read(0).astype(jnp.float32)
    mask = jnp.arange(MBq * BSq)[None, None, :] <= slots[:, :, None]
    want = mla.attend_absorbed(q_nope, q_pe, rows, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-2, rtol=3e-2)  # bf16 keys and probs
