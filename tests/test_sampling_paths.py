"""The sampler costs what the rows ask (serving/sampling.py): an all-greedy batch skips the cut and
the draws, a batch whose every sampled row asks a top-k within PARTIAL_TOP_K cuts on lax.top_k, and
only a top-p (or a large top-k) sorts the vocabulary. Each path gives exactly what the sort of the
whole vocabulary gives (the reference below: the cut as it was before the paths)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.penalties import PenaltyTable
from serving.sampling import PARTIAL_TOP_K, SamplingParams, masked_logits, sampling_arrays, verify

V = 1000


def full_sort_cut(logits, arrays):
    """The reference: min-p, then top-k and top-p over the sorted vocabulary (top_p 1: no cut)."""
    scaled = logits / jnp.maximum(arrays.temperature, 1e-6)[:, None]
    scaled = jnp.where(scaled >= jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(arrays.min_p)[:, None],
                       scaled, -jnp.inf)
    desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(arrays.top_k > 0, jnp.minimum(arrays.top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=1)
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < arrays.top_p[:, None]) | (arrays.top_p >= 1)[:, None]
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= jnp.maximum(threshold, kth), scaled, -jnp.inf)


BATCHES = {  # which path each takes
    "no cut": [SamplingParams(temperature=0.7), SamplingParams(temperature=1.2, min_p=0.05), None],
    "top-k": [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.0, top_k=PARTIAL_TOP_K),
              SamplingParams(temperature=0.5, top_k=40, top_p=0.9), SamplingParams(), None],
    "sort": [SamplingParams(temperature=0.8, top_p=0.8), SamplingParams(temperature=1.0, top_k=200),
             SamplingParams(temperature=0.8, top_k=3)],
}


def arrays_for(params):
    n = len(params)
    return sampling_arrays(params, [p.seed or 0 if p else 0 for p in params], [3] * n, [None] * n, 4)


@pytest.mark.parametrize("name", BATCHES)
def test_each_path_cuts_as_the_full_sort(name):
    params = BATCHES[name]
    arrays = arrays_for(params)
    logits = jax.random.normal(jax.random.key(len(params)), (len(params), V)) * 3
    got = jax.jit(masked_logits)(logits, arrays)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(full_sort_cut(logits, arrays)))
    cut = np.isfinite(np.asarray(got))
    for row, p in enumerate(params):
        if p is not None and 0 < p.top_k < V:
            assert cut[row].sum() <= p.top_k  # the cut happened


def test_greedy_rows_and_sampled_rows_in_one_step():
    """All-greedy batches take the argmax alone; a mixed batch draws its sampled rows as before and
    keeps its greedy rows at the argmax."""
    table = PenaltyTable(1, 4, V, None).device
    logits = jax.random.normal(jax.random.key(0), (6, 1, V)) * 3
    none = jnp.zeros((6, 0), jnp.int32), jnp.zeros(6, jnp.int32)
    step = jax.jit(verify)
    greedy = step(logits, *none, arrays_for([SamplingParams()] * 5 + [None]), table)[0]
    np.testing.assert_array_equal(np.asarray(greedy[:, 0]), np.asarray(jnp.argmax(logits[:, 0], -1)))
    mixed = [SamplingParams(), SamplingParams(temperature=1.0, top_k=3, seed=1), SamplingParams(),
             SamplingParams(temperature=1.0, seed=2), SamplingParams(temperature=0.9, top_p=0.5, seed=3), None]
    tokens = np.asarray(step(logits, *none, arrays_for(mixed), table)[0][:, 0])
    best = np.asarray(jnp.argmax(logits[:, 0], -1))
    assert tokens[0] == best[0] and tokens[2] == best[2] and tokens[5] == best[5]
    top3 = np.argsort(-np.asarray(logits[1, 0]))[:3]
    assert tokens[1] in top3
    # the same rows drawn alone (no greedy neighbours): the same tokens (keys are per row)
    alone = np.asarray(step(logits[np.array([1, 3, 4])], jnp.zeros((3, 0), jnp.int32), jnp.zeros(3, jnp.int32),
                            arrays_for([mixed[1], mixed[3], mixed[4]]), table)[0][:, 0])
    np.testing.assert_array_equal(alone, tokens[[1, 3, 4]])
