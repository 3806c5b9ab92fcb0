"""Incremental decoding, parameter count, MTP, checkpoints round trips, FP8 blocks."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import DeepseekV3, ModelConfig
from model.checkpoint import hf_tensors, save_safetensors
from model.quant import ACTIVATION_BLOCK, dequantize_blocks, quantize_blocks
from model.transformer import param_count

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "tiny" / "config.json"


@pytest.fixture(scope="module")
def tiny():
    return DeepseekV3(ModelConfig.from_json(TINY), jnp.float32, nnx.Rngs(7))


def test_absorbed_decode_matches_full_forward_at_every_position(tiny):
    """Prefill a prompt (naive MLA), then decode the rest one token at a time (absorbed MLA over the
    latent cache); every step's logits must equal the full forward's at that position."""
    rng = np.random.default_rng(0)
    lengths = np.array([3, 6, 1])
    total = 12
    tokens = rng.integers(0, tiny.config.vocab_size, (3, total), dtype=np.int32)
    full = np.asarray(tiny(tokens))
    cache = tiny.init_cache(3, 16)
    prompt = np.where(np.arange(total)[None] < lengths[:, None], tokens, 0)[:, :lengths.max()]
    logits, cache = tiny.prefill(prompt, lengths, cache)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits)[b, :n], full[b, :n], atol=1e-4, rtol=0)
    worst = 0.0
    for step in range(total - lengths.max()):
        pos = lengths + step
        logits, cache = tiny.decode(tokens[np.arange(3), pos], pos, cache)
        ref = full[np.arange(3), pos]
        worst = max(worst, float(np.abs(np.asarray(logits) - ref).max()))
    print("absorbed decode vs full forward, max abs error:", worst)
    assert worst <= 1e-4


def test_chunked_prefill_matches_one_shot(tiny):
    tokens = np.random.default_rng(1).integers(0, tiny.config.vocab_size, (2, 10), dtype=np.int32)
    full = np.asarray(tiny(tokens))
    cache = tiny.init_cache(2, 10)
    first, cache = tiny.prefill(tokens[:, :4], np.array([4, 4]), cache)
    second, cache = tiny.prefill(tokens[:, 4:], np.array([6, 6]), cache, start=np.array([4, 4]))
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), full, atol=1e-4, rtol=0)


def test_greedy_decode_equals_teacher_forced_argmax(tiny):
    prompt = np.array([[5, 9, 2, 7]], np.int32)
    cache = tiny.init_cache(1, 12)
    logits, cache = tiny.prefill(prompt, np.array([4]), cache)
    seq = list(prompt[0])
    nxt = int(np.argmax(logits[0, 3]))
    for pos in range(4, 10):
        seq.append(nxt)
        logits, cache = tiny.decode(np.array([nxt]), np.array([pos]), cache)
        nxt = int(np.argmax(logits[0]))
    forced = np.asarray(tiny(np.array([seq], np.int32)))[0]
    assert [int(t) for t in np.argmax(forced[3:-1], axis=-1)] == seq[4:]


def _deepseek_v3_formula(c: dict) -> tuple[int, int]:
    """DeepSeek-V3's parameter count from its config numbers, written out independently of model/."""
    D, V, H = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
    qr, kr = c["q_lora_rank"], c["kv_lora_rank"]
    nope, rope, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    attn = (D * qr + qr + qr * H * (nope + rope)  # q down, its norm, q up
            + D * (kr + rope) + kr + kr * H * (nope + vd)  # kv down (+ shared rope key), norm, kv up
            + H * vd * D)  # output
    dense_ffn = 3 * D * c["intermediate_size"]
    E, Fm = c["n_routed_experts"], c["moe_intermediate_size"]
    moe_ffn = E * 3 * D * Fm + c["n_shared_experts"] * 3 * D * Fm + E * D + E  # experts, shared, gate + bias
    layer_norms = 2 * D
    k, L = c["first_k_dense_replace"], c["num_hidden_layers"]
    main = 2 * V * D + D + k * (attn + dense_ffn + layer_norms) + (L - k) * (attn + moe_ffn + layer_norms)
    mtp = V * D + 2 * D + 2 * D * D + (attn + moe_ffn + layer_norms) + D + V * D  # embed, e/h norms, eh_proj, layer, head
    return main, c["num_nextn_predict_layers"] * mtp


def test_671b_parameter_count():
    raw = json.loads((CONFIGS / "deepseek-v3-671b" / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw)
    abstract = nnx.eval_shape(lambda: DeepseekV3(cfg, jnp.bfloat16, nnx.Rngs(0)))
    counted = param_count(abstract)
    main, mtp = _deepseek_v3_formula(raw)
    assert counted == main + mtp
    assert round(main / 1e9) == 671  # "671B total parameters"
    # DeepSeek's release: "685B, which includes 671B of the Main Model weights and 14B of the MTP
    # Module" (their rounding; the exact figures are 684.49B and 13.46B)
    assert abs((main + mtp) / 1e9 - 685) < 1 and abs(mtp / 1e9 - 14) < 1
    assert param_count(abstract.mtp) == mtp


def test_orbax_round_trip_restores_identical_parameters(tiny, tmp_path):
    tiny.save(tmp_path / "ckpt")
    back = DeepseekV3.from_pretrained(tmp_path / "ckpt")
    ours, theirs = nnx.to_pure_dict(nnx.state(tiny)), nnx.to_pure_dict(nnx.state(back))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert back.config == tiny.config


def test_safetensors_export_round_trip_with_mtp(tiny, tmp_path):
    """Our writer produces DeepSeek's release layout (MTP as model.layers.{L}.*) that the loader reads back."""
    save_safetensors(tiny, tmp_path / "hf", shard_bytes=200_000)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    back = DeepseekV3.from_pretrained(tmp_path / "hf")
    assert back.config.n_mtp_layers == 1
    names = dict(hf_tensors(back))
    L = tiny.config.num_hidden_layers
    assert f"model.layers.{L}.eh_proj.weight" in names and f"model.layers.{L}.shared_head.head.weight" in names
    for name, arr in hf_tensors(tiny):
        assert np.array_equal(arr, names[name]), name
    tokens = np.array([[1, 2, 3, 4, 5, 6]], np.int32)
    np.testing.assert_array_equal(np.asarray(back.mtp_forward(tokens)), np.asarray(tiny.mtp_forward(tokens)))


def test_fp8_export_is_close_and_loads(tiny, tmp_path):
    save_safetensors(tiny, tmp_path / "fp8", fp8=True)
    back = DeepseekV3.from_pretrained(tmp_path / "fp8")
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
    a, b = np.asarray(tiny(tokens)), np.asarray(back(tokens))
    # e4m3 keeps 3 mantissa bits: a relative step of 2^-4 per weight, averaging out over sums.
    assert np.abs(a - b).max() <= 0.1 * np.abs(a).max()
    assert not np.array_equal(a, b)


def test_mtp_predicts_from_shifted_tokens(tiny):
    """Position i of the MTP head depends on tokens <= i+1 only (it is given token i+1)."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, tiny.config.vocab_size, (1, 8), dtype=np.int32)
    changed = tokens.copy()
    changed[0, 5] = (changed[0, 5] + 1) % tiny.config.vocab_size
    a, b = np.asarray(tiny.mtp_forward(tokens)), np.asarray(tiny.mtp_forward(changed))
    np.testing.assert_array_equal(a[0, :4], b[0, :4])
    assert np.abs(a[0, 4] - b[0, 4]).max() > 0


def _reference_block_quant(x, block):
    """Block by block, with Python loops: the obvious reading of DeepSeek's format."""
    M, N = x.shape
    bm, bn = block
    q = np.zeros_like(x)
    for i in range(0, M, bm):
        for j in range(0, N, bn):
            blk = x[i:i + bm, j:j + bn]
            s = np.abs(blk).max() / 448.0
            q[i:i + bm, j:j + bn] = (blk / s).astype(jnp.float8_e4m3fn).astype(np.float32) * s
    return q


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((5, 300), ACTIVATION_BLOCK), ((64, 64), (128, 128))])
def test_block_quantiser_matches_reference_numpy_and_jax(shape, block):
    x = (np.random.default_rng(2).normal(size=shape) * np.linspace(0.1, 10, shape[1])).astype(np.float32)
    q, s = quantize_blocks(x, block)
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    back = dequantize_blocks(q, s, block)
    np.testing.assert_allclose(back, _reference_block_quant(x, block), rtol=1e-6, atol=1e-6)
    assert np.abs(back - x).max() <= np.abs(x).max() * 2 ** -4  # e4m3: 3 mantissa bits
    qj, sj = jax.jit(lambda v: quantize_blocks(v, block, jnp))(x)
    np.testing.assert_allclose(np.asarray(sj), s, rtol=1e-6)
    # XLA may divide as multiply-by-reciprocal, which can tip an exact rounding tie by one e4m3 step.
    differ = np.asarray(qj.astype(jnp.float32)) != q.astype(np.float32)
    assert differ.mean() < 1e-3
    np.testing.assert_allclose(np.asarray(dequantize_blocks(qj, sj, block, jnp.float32, jnp)), back, rtol=2 ** -3)
