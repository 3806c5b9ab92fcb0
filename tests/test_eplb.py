"""EPLB: placement invariants, quality on Zipf loads against DeepSeek's greedy, bad input."""

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharding.eplb import balancedness, gpu_loads, rebalance_experts, zipf_loads

PREFILL = (288, 8, 4, 32)  # num_replicas, num_groups, num_nodes, num_gpus: hierarchical
DECODE = (288, 8, 18, 144)  # 8 groups over 18 nodes: global
ALPHAS = (0.6, 0.8, 1.0, 1.2)
# DeepSeek's greedy EPLB on these loads as published (2 decimals), per setting and alpha.
PUBLISHED = {"prefill": (1.07, 1.17, 1.45, 2.01), "decode": (1.35, 1.63, 2.04, 2.48)}
# Ours may exceed a published figure by at most the spread of DeepSeek's own greedy between seeds
# of the same generator (prefill alpha 0.6: 1.065-1.086 over seeds 0-9), because in two settings
# the figure is below what placement reaches on seed 0: prefill alpha 0.6, where the heaviest node
# alone forces 1.077 (hierarchical_bound), and decode alpha 1.0, where an exact search over replica
# counts (a MILP, offline, 3 layers) found nothing better than the greedy.
PUBLISHED_SLACK = 0.01


def deepseek_packing(weight, num_packs):
    """DeepSeek's balanced_packing: [X, n] -> (pack, rank in pack) [X, n]."""
    rows, n = weight.shape
    per_pack = n // num_packs
    pack, rank = np.empty((rows, n), np.int64), np.empty((rows, n), np.int64)
    for x in range(rows):
        load, items = [0.0] * num_packs, [0] * num_packs
        for i in np.argsort(-weight[x], kind="stable"):
            p = min((j for j in range(num_packs) if items[j] < per_pack), key=load.__getitem__)
            pack[x, i], rank[x, i] = p, items[p]
            load[p] += weight[x, i]
            items[p] += 1
    return pack, rank


def deepseek_greedy(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """DeepSeek's EPLB (github.com/deepseek-ai/EPLB) in numpy, the baseline: -> phy2log, logcnt."""
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    layers, num_logical = weight.shape
    group_size, per_gpu = num_logical // num_groups, num_replicas // num_gpus
    gpack, grank = deepseek_packing(weight.reshape(layers, num_groups, group_size).sum(-1), num_nodes)
    log2mlog = ((gpack * (num_groups // num_nodes) + grank) * group_size)[..., None] + np.arange(group_size)
    log2mlog = log2mlog.reshape(layers, num_logical)
    mlog2log = np.argsort(log2mlog, -1)
    w = np.take_along_axis(weight, mlog2log, -1).reshape(layers * num_nodes, -1)  # node by node
    cnt = np.ones(w.shape, np.int64)
    extra = []
    for _ in range(num_replicas // num_nodes - w.shape[1]):
        extra.append((w / cnt).argmax(-1))
        cnt[np.arange(len(w)), extra[-1]] += 1
    phy2mlog = np.concatenate([np.tile(np.arange(w.shape[1]), (len(w), 1)),
                               np.array(extra, np.int64).reshape(-1, len(w)).T], 1)
    pack, rank = deepseek_packing(np.take_along_axis(w / cnt, phy2mlog, -1), num_gpus // num_nodes)
    slot2mlog = np.empty_like(phy2mlog)
    np.put_along_axis(slot2mlog, pack * per_gpu + rank, phy2mlog, -1)
    slot2mlog = slot2mlog.reshape(layers, num_nodes, -1) + (np.arange(num_nodes) * (num_logical // num_nodes))[:, None]
    phy2log = np.take_along_axis(mlog2log, slot2mlog.reshape(layers, -1), -1)
    return phy2log, np.take_along_axis(cnt.reshape(layers, -1), log2mlog, -1)


def check_placement(w, num_replicas, num_groups, num_nodes, num_gpus, hierarchical, result):
    phy2log, log2phy, logcnt = result
    layers, num_logical = w.shape
    assert phy2log.shape == (layers, num_replicas) and phy2log.dtype == np.int64
    assert log2phy.shape == (layers, num_logical, num_replicas - num_logical + 1) and log2phy.dtype == np.int64
    assert logcnt.shape == (layers, num_logical) and logcnt.dtype == np.int64
    assert ((0 <= phy2log) & (phy2log < num_logical)).all()
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == num_replicas).all()
    for layer in range(layers):
        assert (np.bincount(phy2log[layer], minlength=num_logical) == logcnt[layer]).all()
        for e in range(num_logical):
            n = logcnt[layer, e]
            assert (log2phy[layer, e, :n] == np.flatnonzero(phy2log[layer] == e)).all()
            assert (log2phy[layer, e, n:] == -1).all()
    loads = gpu_loads(w, phy2log, logcnt, num_gpus)  # [L, G]: every slot counted once, load conserved
    assert loads.shape == (layers, num_gpus)
    np.testing.assert_allclose(loads.sum(-1), w.sum(-1), rtol=1e-9)
    if hierarchical:
        node_of_slot = np.arange(num_replicas) // (num_replicas // num_nodes)
        group_of_slot = phy2log // (num_logical // num_groups)  # [L, R]
        for layer in range(layers):
            pairs = set(zip(group_of_slot[layer], node_of_slot))
            assert len(pairs) == num_groups, "a group's replicas span more than one node"
            per_node = np.bincount([node for _, node in pairs], minlength=num_nodes)
            assert (per_node == num_groups // num_nodes).all()


@st.composite
def problems(draw):
    nodes = draw(st.integers(1, 3))
    gpus = nodes * draw(st.integers(1, 3))
    hierarchical_shape = draw(st.booleans())
    groups = nodes * draw(st.integers(1, 3)) if hierarchical_shape else draw(st.integers(1, 4))
    experts = groups * draw(st.integers(1, 4))
    replicas = gpus * (-(-experts // gpus) + draw(st.integers(0, 2)))
    layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["lognormal", "counts", "zeros", "one-hot"]))
    if kind == "lognormal":
        w = rng.lognormal(0.0, 1.5, (layers, experts))
    elif kind == "counts":  # small integers: many ties
        w = rng.integers(0, 4, (layers, experts)).astype(float)
    else:
        w = np.zeros((layers, experts))
        if kind == "one-hot":
            w[:, rng.integers(experts)] = 100.0
    policies = ["auto", "global"] + (["hierarchical"] if groups % nodes == 0 else [])
    return w, (replicas, groups, nodes, gpus), draw(st.sampled_from(policies)), kind


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(problems())
def test_placement_invariants(problem):
    w, shape, policy, kind = problem
    replicas, groups, nodes, gpus = shape
    result = rebalance_experts(w, *shape, policy=policy)
    hierarchical = policy == "hierarchical" or (policy == "auto" and groups % nodes == 0)
    check_placement(w, *shape, hierarchical, result)
    if kind == "lognormal":  # no ties, so DeepSeek's placement is one of our candidates exactly
        ours = gpu_loads(w, result[0], result[2], gpus).max(-1)
        args = shape if hierarchical else (replicas, 1, 1, gpus)
        phy2log, logcnt = deepseek_greedy(w, *args)
        assert (ours <= gpu_loads(w, phy2log, logcnt, gpus).max(-1) * (1 + 1e-9)).all()


def test_policy_choice():
    w = zipf_loads(1.0, num_layers=4)

    def same(a, b):
        return all((x == y).all() for x, y in zip(a, b))

    assert same(rebalance_experts(w, *PREFILL, policy="global"), rebalance_experts(w, 288, 1, 1, 32))
    assert same(rebalance_experts(w, *PREFILL), rebalance_experts(w, *PREFILL, policy="hierarchical"))
    assert same(rebalance_experts(w, *DECODE), rebalance_experts(w, *DECODE, policy="global"))
    assert not same(rebalance_experts(w, *PREFILL), rebalance_experts(w, *PREFILL, policy="global"))
    with pytest.raises(ValueError, match="hierarchical policy needs num_groups=8 divisible by num_nodes=18"):
        rebalance_experts(w, *DECODE, policy="hierarchical")


def test_loads_and_balancedness_by_hand():
    w = np.array([[6.0, 3.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    phy2log = np.array([[0, 1, 0, 2, 3, 0], [0, 1, 0, 2, 3, 0]])
    logcnt = np.array([[3, 1, 1, 1], [3, 1, 1, 1]])
    np.testing.assert_allclose(gpu_loads(w, phy2log, logcnt, 2), [[7.0, 5.0], [0.0, 0.0]])
    np.testing.assert_allclose(balancedness(w, phy2log, logcnt, 2), [7 / 6, 1.0])
    # 3 replicas of expert 0 (2 each) + 3, 1, 2 split 6 / 6; DeepSeek's replication finds it
    phy2log, _, logcnt = rebalance_experts(w, 6, 1, 1, 2)
    assert (logcnt[0] == [3, 1, 1, 1]).all()
    np.testing.assert_allclose(balancedness(w, phy2log, logcnt, 2), [1.0, 1.0])


def hierarchical_bound(w, num_groups, num_nodes, num_gpus):
    """[L]: no placement keeping groups inside nodes beats its heaviest node spread evenly over the
    node's GPUs; minimised over every even split of the groups over the nodes."""
    size = num_groups // num_nodes
    splits = [s for s in itertools.permutations(range(num_groups))
              if all(list(s[i:i + size]) == sorted(s[i:i + size]) for i in range(0, num_groups, size))]
    group_load = w.reshape(len(w), num_groups, -1).sum(-1)  # [L, groups]
    node_load = group_load[:, np.array(splits)].reshape(len(w), len(splits), num_nodes, size).sum(-1)
    return node_load.max(-1).min(-1) / (num_gpus // num_nodes) / (w.sum(-1) / num_gpus)


def replica_bound(w, num_replicas, num_gpus):
    """[L]: no GPU is lighter than its heaviest replica; DeepSeek's replication minimises that."""
    phy2log, logcnt = deepseek_greedy(w, num_replicas, 1, 1, num_gpus)
    return np.maximum((w / logcnt).max(-1) / (w.sum(-1) / num_gpus), 1.0)


def test_quality_on_zipf_loads():
    rows = []
    for name, shape in (("prefill", PREFILL), ("decode", DECODE)):
        gpus = shape[3]
        for alpha, published in zip(ALPHAS, PUBLISHED[name]):
            w = zipf_loads(alpha, seed=0)
            start = time.perf_counter()
            phy2log, _, logcnt = rebalance_experts(w, *shape)
            seconds = time.perf_counter() - start
            ours = balancedness(w, phy2log, logcnt, gpus).mean()
            greedy = balancedness(w, *deepseek_greedy(w, *shape), gpus).mean()
            if name == "prefill":
                bound = hierarchical_bound(w, *shape[1:]).mean()
            else:
                bound = replica_bound(w, shape[0], gpus).mean()
            rows.append((name, alpha, ours, greedy, published, bound, seconds))
    print(f"\n{'setting':8} {'alpha':>5} {'ours':>7} {'greedy':>7} {'publ.':>6} {'bound':>7} "
          f"{'ours/publ':>9} {'ms':>6}")
    for name, alpha, ours, greedy, published, bound, seconds in rows:
        print(f"{name:8} {alpha:5.1f} {ours:7.4f} {greedy:7.4f} {published:6.2f} {bound:7.4f} "
              f"{ours / published:9.4f} {seconds * 1e3:6.1f}")
    ours, greedy, published, bound, seconds = (np.array(c, float) for c in list(zip(*rows))[2:])
    print(f"mean ours/published {np.mean(ours / published):.4f}, ours/greedy {np.mean(ours / greedy):.4f}")
    assert (ours <= greedy * (1 + 1e-9)).all(), "worse than DeepSeek's greedy on the same loads"
    assert (ours <= published + PUBLISHED_SLACK).all(), "worse than a published greedy figure"
    assert (ours >= bound * (1 - 1e-9)).all(), "below a lower bound: the metric is broken"
    assert (ours[:4] <= bound[:4] * 1.002).all(), "prefill not within 0.2% of the hierarchical bound"
    assert np.mean(ours / published) <= 0.965 and np.mean(ours / greedy) <= 0.965
    assert ours[3] <= 0.8 * published[3]  # prefill alpha 1.2: hot experts no longer share GPUs
    assert seconds.max() < 2.0, "58 layers should rebalance in well under a second"


@pytest.mark.parametrize("args,kwargs,message", [
    ((np.ones((2, 8)), 9, 2, 1, 2), {}, r"num_replicas=9 is not divisible by num_gpus=2"),
    ((np.ones((2, 8)), 12, 2, 4, 6), {}, r"num_gpus=6 is not divisible by num_nodes=4"),
    ((np.ones((2, 8)), 6, 2, 1, 2), {}, r"num_replicas=6 is fewer than the 8 logical experts"),
    ((np.ones((2, 8)), 8, 3, 1, 2), {}, r"8 logical experts are not divisible by num_groups=3"),
    ((-np.ones((2, 8)), 8, 2, 1, 2), {}, r"weight contains negative loads"),
    ((np.full((2, 8), np.nan), 8, 2, 1, 2), {}, r"weight contains non-finite loads"),
    ((np.full((2, 8), np.inf), 8, 2, 1, 2), {}, r"weight contains non-finite loads"),
    ((np.ones(8), 8, 2, 1, 2), {}, r"weight must be a non-empty 2-D .* got shape \(8,\)"),
    ((np.ones((2, 0)), 8, 2, 1, 2), {}, r"weight must be a non-empty 2-D .* got shape \(2, 0\)"),
    ((np.array([["a"] * 8]), 8, 2, 1, 2), {}, r"weight must hold real numbers"),
    ((np.ones((2, 8)), 8, 0, 1, 2), {}, r"num_groups must be a positive integer, got 0"),
    ((np.ones((2, 8)), 8.0, 2, 1, 2), {}, r"num_replicas must be a positive integer, got 8.0"),
    ((np.ones((2, 8)), 8, 2, 1, 2), {"policy": "fast"}, r"policy must be one of .* got 'fast'"),
    ((np.ones((2, 8)), 8, 3, 2, 2), {"policy": "hierarchical"}, r"8 logical experts are not divisible"),
    ((np.ones((2, 8)), 8, 2, 4, 4), {"policy": "hierarchical"},
     r"hierarchical policy needs num_groups=2 divisible by num_nodes=4"),
])
def test_bad_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rebalance_experts(*args, **kwargs)


def test_bad_placement_shapes():
    with pytest.raises(ValueError, match=r"shapes do not fit"):
        gpu_loads(np.ones((2, 4)), np.zeros((2, 6), int), np.ones((2, 5), int), 2)
    with pytest.raises(ValueError, match=r"6 physical experts are not divisible by num_gpus=4"):
        gpu_loads(np.ones((2, 4)), np.zeros((2, 6), int), np.ones((2, 4), int), 4)
