"""MTP speculative decoding (issue 22): greedy output identical with and without drafts (stop tokens and
max_tokens inside an accepted run included), speculative sampling's output distribution equal to plain
sampling's (a chi-square test that catches a biased acceptance rule), the tiny model's acceptance, the
statistics and /metrics, and bad configuration."""

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from serving import LLM, SamplingParams
from sharding.deployment import Deployment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from demo import expected, questions  # noqa: E402  (the demo's prompts: the tiny model's three tasks)

# one block per request: one context bucket, so each engine compiles one prefill and one decode step
SERVING = {"block_size": 64, "decode_batch": [8], "prefill_tokens": [32], "prefill_rows": [8], "max_model_len": 48}
PROMPTS = questions(12, 0) + ["sort 3141=1134 reverse 2718=8172 add 5+5="]  # the last: two prefill chunks


def deployment(dp: int, speculative="auto") -> Deployment:
    return Deployment(name=f"spec-dp{dp}", dp=dp, redundant_experts=0, serving=SERVING, speculative=speculative)


@pytest.fixture(scope="module")
def plain():
    return LLM(deployment=deployment(1, None))


@pytest.fixture(scope="module")
def mtp():
    return LLM(deployment=deployment(1))  # on by default: the tiny model has an MTP module


def greedy_params():
    """Plain, a max_tokens that cuts a two-token run in half, and stop tokens met inside runs."""
    digits = [2 + i for i in range(10)]  # whatever ids: a stop among the answer's tokens ends it early
    return [SamplingParams(max_tokens=16) if i % 3 == 0 else SamplingParams(max_tokens=3 + i % 4) if i % 3 == 1
            else SamplingParams(max_tokens=16, stop_token_ids=tuple(digits[i % 5::5])) for i in range(len(PROMPTS))]


@pytest.mark.parametrize("dp", [1, 8], ids=["one-device", "EP8"])
def test_greedy_identical_with_and_without_mtp(plain, mtp, dp):
    reference = plain.generate(PROMPTS, greedy_params())
    llm = mtp if dp == 1 else LLM(deployment=deployment(8))
    before = dict(llm.stats()["speculative"])
    outs = llm.generate(PROMPTS, greedy_params())
    for q, ref, out in zip(PROMPTS, reference, outs):
        assert (out.token_ids, out.finish_reason) == (ref.token_ids, ref.finish_reason), q
    assert sum(o.text == expected(q) for q, o in zip(PROMPTS[::3], outs[::3])) >= 3  # answers, not noise
    assert any(o.finish_reason == "stop" for o in outs) and any(o.finish_reason == "length" for o in outs)
    spec = llm.stats()["speculative"]
    assert spec["num_tokens"] == 1 and spec["drafts"] > before["drafts"]
    assert plain.stats()["speculative"]["drafts"] == 0 and plain.stats()["speculative"]["tokens_per_step"] == 1.0


def test_greedy_identical_on_a_random_checkpoint_with_two_drafts(tmp_path_factory):
    """A random DeepSeek-V3 config with an MTP layer (configs/tiny, not the trained model): its drafts
    are mostly wrong, so rejected runs dominate, and each step drafts twice (the module reused on its
    own output); greedy output is still exactly the plain engine's."""
    from tiny import save_tiny
    path = tmp_path_factory.mktemp("random-mtp")
    vocab = save_tiny(path, 3).config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 9, 17, 30)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    reference = LLM(path, deployment=deployment(1, None)).generate(prompts, params)
    llm = LLM(path, deployment=deployment(1, {"method": "mtp", "num_tokens": 2}))
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    assert all(len(o.token_ids) == 12 for o in outs)
    spec = llm.stats()["speculative"]
    print(f"random checkpoint, k=2: acceptance {spec['acceptance_rate']:.2f}", file=sys.stderr)
    assert spec["num_tokens"] == 2 and spec["draft_tokens"] > 0 and spec["accepted"] < spec["draft_tokens"]


def test_tiny_model_accepts_most_drafts_and_reports_them(mtp):
    from serving.metrics import ServerMetrics, engine_snapshot
    mtp.engine.counters.update(spec_drafts=0, spec_draft_tokens=0, spec_accepted_tokens=0)
    outs = mtp.generate(questions(24, 0), SamplingParams(max_tokens=16))
    assert all(o.text == expected(q) for q, o in zip(questions(24, 0), outs))
    spec = mtp.stats()["speculative"]
    assert spec["acceptance_rate"] >= 0.8, spec
    assert spec["tokens_per_step"] == pytest.approx(1 + spec["acceptance_rate"])
    text = ServerMetrics().render(engine_snapshot(mtp.engine)).decode()
    assert f"jaxseek_spec_decode_num_accepted_tokens_total {float(spec['accepted'])}" in text
    assert f"jaxseek_spec_decode_num_draft_tokens_total {float(spec['draft_tokens'])}" in text


def test_sampled_tokens_distributed_as_plain_sampling(plain, mtp):
    """Many seeded requests of one prompt at temperature 1.5: the tokens after the first (sampled by
    verify windows under MTP) have the same distribution with and without drafts (two-sample chi-square)."""
    prompt, n = [0, 20, 30, 40], 96
    params = [SamplingParams(max_tokens=4, temperature=1.5, ignore_eos=True, seed=s) for s in range(n)]
    a, b = ([t for o in llm.generate([prompt] * n, params) for t in o.token_ids[1:]] for llm in (plain, mtp))
    keys = sorted(set(a) | set(b))
    table = np.array([[x.count(k) for k in keys] for x in (a, b)])
    table = np.concatenate([table[:, table.sum(0) >= 10], table[:, table.sum(0) < 10].sum(1, keepdims=True)], 1)
    table = table[:, table.sum(0) > 0]
    assert table.shape[1] >= 3  # a real spread of tokens, not one
    assert scipy_stats.chi2_contingency(table).pvalue > 1e-3


def _verify_draws(acceptance, temperature, n=6000):
    """verify() on fixed logits: 2 window positions, one draft (the second most likely token) per row."""
    from serving.penalties import PenaltyTable
    from serving.sampling import accept_probability, sampling_arrays, verify
    V = 6
    logits = np.random.default_rng(3).normal(size=(2, V)).astype(np.float32) * 1.5
    draft = int(np.argsort(logits[0])[-2])
    arrays = sampling_arrays([SamplingParams(temperature=temperature, top_k=4)] * n, list(range(n)), [7] * n,
                             [None] * n, 1)
    fn = jax.jit(lambda x, d, k, s, t: verify(x, d, k, s, t, acceptance or accept_probability))
    tokens, accepted, _ = fn(jnp.broadcast_to(logits, (n, 2, V)), jnp.full((n, 1), draft, jnp.int32),
                             jnp.ones(n, jnp.int32), arrays, PenaltyTable(1, 1, V, None).device)

    def target(x):  # temperature, then top-k 4
        if temperature == 0:
            return None
        x = x.astype(np.float64) / temperature
        x = np.where(x >= np.sort(x)[-4], x, -np.inf)
        return np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    return np.asarray(tokens), np.asarray(accepted), target(logits[0]), target(logits[1]), draft


def _chi2(samples, p):
    observed = np.bincount(samples, minlength=len(p))
    keep = p > 0
    assert observed[~keep].sum() == 0  # nothing outside top-k
    expected = p[keep] / p[keep].sum() * observed.sum()
    return scipy_stats.chisquare(observed[keep], expected).pvalue


def test_speculative_sampling_equals_target_and_a_biased_rule_is_caught():
    tokens, accepted, p0, p1, draft = _verify_draws(None, 0.8)
    assert _chi2(tokens[:, 0], p0) > 1e-3  # the first token: accepted draft or residual draw, ~ p0
    assert _chi2(tokens[accepted == 1, 1], p1) > 1e-3  # the bonus token after an accepted draft, ~ p1
    assert abs(accepted.mean() - p0[draft]) < 0.03
    biased, _, p0, _, _ = _verify_draws(lambda p: jnp.minimum(1.0, 2 * p), 0.8)
    assert _chi2(biased[:, 0], p0) < 1e-6
    greedy, accepted, _, _, draft = _verify_draws(None, 0.0, n=8)  # greedy: the draft is not the argmax
    assert (accepted == 0).all() and (greedy[:, 0] != draft).all()


def test_bad_speculative_configuration_is_one_sentence():
    from flax import nnx

    from model import DeepseekV3, ModelConfig
    from serving.api import add_speculative_flags, speculative_flag
    from serving.engine import Engine
    with pytest.raises(ValueError, match=r"num_tokens must be a positive integer, got 0$"):
        deployment(1, {"method": "mtp", "num_tokens": 0})
    ap = argparse.ArgumentParser()
    add_speculative_flags(ap)
    with pytest.raises(ValueError, match=r"num_tokens must be a positive integer, got -1$"):
        deployment(1, speculative_flag(ap.parse_args(["--speculative-tokens", "-1"])))
    assert speculative_flag(ap.parse_args(["--no-speculative"])) is None
    cfg = dataclasses.replace(ModelConfig.from_json(ROOT / "models/jaxseek-tiny/config.json"), num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match=r"needs the checkpoint's MTP weights, and this checkpoint has none"):
        Engine(nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0))), deployment(1, {"method": "mtp", "num_tokens": 1}))
