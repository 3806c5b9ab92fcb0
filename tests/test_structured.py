"""Structured outputs on the host and in the sampler (serving/structured.py, serving/sampling.py): a
guide's masks follow the MTP drafts it will verify and roll back, min_tokens and the reasoning gate
along the window, grammars refused in one sentence; and verification rejects a draft the mask leaves
out (greedy and sampled), drawing only tokens the mask allows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.penalties import PenaltyTable
from serving.sampling import SamplingParams, sampling_arrays, verify
from serving.structured import Grammars, StructuredOutputs, fill_masks
from server_util import TINY_MODEL

VOCAB, EOS = 101, 1


@pytest.fixture(scope="module")
def grammars():
    return Grammars(TINY_MODEL / "tokenizer.json", VOCAB, (EOS,))


@pytest.fixture(scope="module")
def ids(grammars):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(TINY_MODEL / "tokenizer.json"))
    return lambda text: [tok.token_to_id(c) for c in text]


def allowed(mask_row) -> set[int]:
    return {t for t in range(VOCAB) if (int(mask_row[t // 32]) >> (t % 32)) & 1}


def window(guide, drafts, words):
    mask, guided = fill_masks([(0, guide, drafts)], 1, len(drafts) + 1, words)
    assert guided.tolist() == [True]
    return [allowed(mask[0, j]) for j in range(len(drafts) + 1)]


def test_masks_follow_the_drafts_and_roll_back(grammars, ids):
    guide = grammars.guide(SamplingParams(max_tokens=9, structured_outputs={"regex": "ab(c|d)e"}))
    a, b, c, d, e, x = ids("abcdex")
    assert window(guide, [a, b], grammars.words) == [{a}, {b}, {c, d}]
    assert window(guide, [], grammars.words) == [{a}]  # the trial advance over the drafts was rolled back
    assert window(guide, [a, x, c], grammars.words)[:2] == [{a}, {b}]  # x refused: verification rejects it
    guide.advance([a])  # the step accepted one token of its window
    assert window(guide, [b, d], grammars.words) == [{b}, {c, d}, {e}]
    guide.advance([b, d, e])
    assert window(guide, [], grammars.words) == [{EOS}]  # done: EOS only


def test_min_tokens_and_the_reasoning_gate_along_the_window(grammars, ids):
    guide = grammars.guide(SamplingParams(max_tokens=9, min_tokens=2, stop_token_ids=(7,)))
    free = set(range(VOCAB))
    assert window(guide, [9, 9], grammars.words) == [free - {EOS, 7}, free - {EOS, 7}, free]
    gated = grammars.guide(SamplingParams(max_tokens=30, structured_outputs=StructuredOutputs(
        choice=["yes"], after=tuple(ids("</think>")))))
    masks = window(gated, ids("ok</think>"), grammars.words)
    assert masks[:-1] == [free] * 10 and masks[-1] == set(ids("y"))  # the grammar starts after </think>
    gated.advance(ids("hm</think>y"))
    assert window(gated, [], grammars.words) == [set(ids("e"))]


@pytest.mark.parametrize("spec, message", [
    ({"regex": "(open"}, "regex: .*unclosed group"),
    ({"json": {"type": "nope"}}, "json: .*nope"),
    ({"json": "{not json"}, "the schema is not JSON"),
    ({"regex": "[^\\s\\S]"}, "matches no text this model's vocabulary can spell"),
    ({"regex": "é+"}, "matches no text this model's vocabulary can spell"),
    ({"grammar": "start: nowhere"}, "grammar: .*nowhere"),
    ({"json": {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(20_000)}}}, "too large"),
])
def test_grammars_refused_in_one_sentence(grammars, spec, message):
    with pytest.raises(ValueError, match=message):
        grammars.guide(SamplingParams(structured_outputs=spec))


def test_verify_rejects_a_draft_the_mask_leaves_out():
    """The draft is the target's favourite token at window position 0, but the grammar's mask there
    leaves it out: it is rejected (greedy and sampled) and the token drawn is one the mask allows."""
    n, V = 512, 8
    logits = np.zeros((n, 2, V), np.float32)
    logits[:, 0, 3] = 5.0  # the draft: token 3
    logits[:, 0, 5] = 1.0
    mask = np.full((n, 2, 1), -1, np.int32)
    mask[:, 0, 0] = (1 << 5) | (1 << 6)  # position 0 allows 5 and 6 only
    table = PenaltyTable(1, 1, V, None).device
    for temperature in (0.0, 1.0):
        arrays = sampling_arrays([SamplingParams(temperature=temperature)] * n, list(range(n)), [7] * n, [None] * n,
                                 1, jnp.asarray(mask), np.ones(n, bool))
        tokens, accepted, _ = jax.jit(verify)(jnp.asarray(logits), jnp.full((n, 1), 3, jnp.int32),
                                              jnp.ones(n, jnp.int32), arrays, table)
        tokens, accepted = np.asarray(tokens), np.asarray(accepted)
        assert (accepted == 0).all()
        assert set(tokens[:, 0]) <= {5, 6} and (temperature == 0) == (set(tokens[:, 0]) == {5})
    unguided = sampling_arrays([SamplingParams()] * n, list(range(n)), [7] * n, [None] * n, 1, jnp.asarray(mask),
                               np.zeros(n, bool))  # no row constrained: the mask is not applied
    _, accepted, _ = jax.jit(verify)(jnp.asarray(logits), jnp.full((n, 1), 3, jnp.int32), jnp.ones(n, jnp.int32),
                                     unguided, table)
    assert (np.asarray(accepted) == 1).all()
