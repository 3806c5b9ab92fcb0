"""The prefill and decode load balancers (serving/balance.py) driving the engine's schedulers."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_balance import simulate  # noqa: E402

from serving.balance import Balancedness, Balancer, core_attention  # noqa: E402


def test_core_attention_counts_each_new_position_once():
    assert core_attention(4, 0) == 1 + 2 + 3 + 4
    assert core_attention(4, 2) == 3 + 4  # cached rows are attended to, not recomputed
    assert core_attention(7, 7) == 0


def test_balancer_prefers_the_least_loaded_rank_and_a_cached_prefix():
    b = Balancer()
    loads = np.array([[100.0, 10], [40, 4], [40, 4]])
    cost = np.tile([30.0, 3], (3, 1))
    assert b.choose(loads, cost, np.ones(3, bool)) == 1
    assert b.choose(loads, cost, np.array([True, False, True])) == 2  # a draining rank takes nothing
    cost[2] = [5, 1]  # rank 2 holds most of the prompt in its prefix cache
    assert b.choose(loads, cost, np.ones(3, bool)) == 2
    assert b.choose(loads, cost, np.zeros(3, bool)) is None


def test_round_robin_cycles_over_allowed_ranks():
    b = Balancer("round_robin")
    allowed = np.array([True, False, True, True])
    picks = [b.choose(np.zeros((4, 2)), np.ones((4, 2)), allowed) for _ in range(6)]
    assert picks == [0, 2, 3, 0, 2, 3]
    with pytest.raises(ValueError, match="round_robin"):
        Balancer("random")


def test_balancedness_weighs_samples_by_load():
    b = Balancedness()
    b.record([1, 0, 0, 0])  # a lone request: 4.0, but little is at stake
    b.record([100, 100, 100, 120])
    s = b.summary()
    assert s["max"] == 4.0 and s["overall"] == pytest.approx(121 / 105.25)


@pytest.fixture(scope="module")
def skewed():
    """Prompts of 16..2,048 tokens, 20% long, on a loaded prefill slice: both placements."""
    return {p: simulate(p, n=700, ranks=4, seed=3, load=1.0) for p in ("balanced", "round_robin")}


@pytest.mark.parametrize("quantity", ["prefill_core_attention", "prefill_input_tokens", "decode_kv_tokens",
                                      "decode_requests"])
def test_balancers_beat_round_robin_on_a_skewed_workload(skewed, quantity):
    balanced, rr = skewed["balanced"][quantity], skewed["round_robin"][quantity]
    print(f"{quantity}: balanced {balanced['overall']:.3f}, round-robin {rr['overall']:.3f}")
    assert balanced["samples"] > 50
    assert balanced["overall"] <= 1.10
    assert balanced["overall"] < rr["overall"]
