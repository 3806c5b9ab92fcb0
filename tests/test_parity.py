"""Our DeepseekV3 against transformers' DeepseekV3ForCausalLM, on checkpoints it saved."""

import numpy as np
import pytest
import torch

from hf_reference import hf_logits, make_checkpoint, resave_fp8, tiny_config
from model import DeepseekV3

TOL = 1e-4


def _batch(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(len(lengths), max(lengths)), dtype=np.int32)
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    return tokens


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = make_checkpoint(path, tiny_config())
    return path, model


@pytest.mark.parametrize("q_lora_rank", [48, None], ids=["q_lora", "q_proj"])
def test_logits_match_transformers(tmp_path, q_lora_rank, hf_pair):
    if q_lora_rank is None:
        path, hf = tmp_path, make_checkpoint(tmp_path, tiny_config(q_lora_rank=None), seed=1)
    else:
        path, hf = hf_pair
    net = DeepseekV3.from_pretrained(path)
    lengths = [11, 7, 3]
    tokens = _batch(net.config.vocab_size, lengths)
    ref = hf_logits(hf, tokens, lengths)
    ours = np.asarray(net(tokens))
    assert np.abs(ref).max() > 0.1  # logits are not trivially small
    errs = [np.abs(ours[b, :n] - ref[b, :n]).max() for b, n in enumerate(lengths)]
    print(f"parity max abs error ({'q_lora' if q_lora_rank else 'q_proj'}):", max(errs))
    assert max(errs) <= TOL


def test_prefill_with_lengths_matches_transformers(hf_pair):
    path, hf = hf_pair
    net = DeepseekV3.from_pretrained(path)
    lengths = [9, 4]
    tokens = _batch(net.config.vocab_size, lengths, seed=3)
    logits, _ = net.prefill(tokens, np.array(lengths), net.init_cache(2, 16))
    ref = hf_logits(hf, tokens, lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits)[b, :n], ref[b, :n], atol=TOL, rtol=0)


def test_fp8_block_checkpoint_matches_dequantised_reference(tmp_path, hf_pair):
    src, hf = hf_pair
    block = (16, 16)  # several blocks per matrix, ragged edges (48, 88, ... are not multiples of 16)
    deq = resave_fp8(src, tmp_path / "fp8", block)
    net = DeepseekV3.from_pretrained(tmp_path / "fp8")
    assert net.config.fp8_block_size == block
    with torch.no_grad():  # the e4m3 rounding really happened, so the reference moved
        assert (deq.model.layers[0].self_attn.q_b_proj.weight - hf.model.layers[0].self_attn.q_b_proj.weight
                ).abs().max() > 1e-4
    tokens = _batch(net.config.vocab_size, [8, 8], seed=5)
    err = np.abs(np.asarray(net(tokens)) - hf_logits(deq, tokens)).max()
    print("fp8 checkpoint parity max abs error:", err)
    assert err <= TOL
