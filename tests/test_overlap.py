"""Two-batch overlap and the 5-stage decode pipeline: same numbers, independent micro-batches."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import Literal

from tiny import save_tiny
from model import DeepseekV3
from model.cache import DenseCache
from model.checkpoint import save_safetensors
from model.layers import rope_cos_sin
from model.transformer import causal_mask
from serving import LLM, SamplingParams
from sharding.deployment import Deployment
from model.overlap import SCHEDULES, balanced_slots, overlapped_layer

# One capacity bucket, the worst case (it cannot overflow): what is proved here does not depend on
# the bucket, and every escalation would compile each program again (tests/test_ep.py covers them).
EXACT = Deployment(name="ep8", dp=8, redundant_experts=8, dispatch_dtype="fp32", combine_dtype="fp32",
                   capacity_factors=(None,))


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("overlap")
    save_tiny(path, 21)
    return DeepseekV3.from_pretrained(path, deployment=EXACT)


def _with(net, overlap):
    net.set_expert_parallel(dataclasses.replace(net.ep, overlap=overlap, level=0))
    return net


@pytest.mark.parametrize("schedule", ["two_batch", "five_stage"])
def test_overlap_equals_plain_prefill_and_decode(net, schedule):
    rng = np.random.default_rng(0)
    # 3 rows per rank: micro-batches of 2 and 1 rows (uneven); rank 5's second half is all padding
    tokens = rng.integers(0, 128, (24, 7), dtype=np.int32)
    lengths = np.full(24, 7)
    lengths[5 * 3 + 2] = 0
    lengths[2] = 3
    results = {}
    for overlap in ("none", schedule):
        _with(net, overlap)
        cache = net.init_cache(24, 12)
        prefill, cache = net.prefill(tokens, lengths, cache)
        pos = np.where(lengths > 0, lengths, -1)
        decode, _ = net.decode(tokens[:, 0], pos, cache)
        results[overlap] = (np.asarray(prefill), np.asarray(decode))
    _with(net, "none")
    valid = np.arange(7)[None] < lengths[:, None]
    np.testing.assert_allclose(results[schedule][0][valid], results["none"][0][valid], atol=1e-6, rtol=0)
    live = lengths > 0
    np.testing.assert_allclose(results[schedule][1][live], results["none"][1][live], atol=1e-6, rtol=0)


def _eqns_in(jaxpr, scope):
    return [e for e in jaxpr.eqns if scope in str(e.source_info.name_stack)]


@pytest.mark.parametrize("schedule,absorbed", [("two_batch", False), ("five_stage", True)])
def test_what_runs_beside_each_all_to_all_does_not_wait_for_it(net, schedule, absorbed):
    """Walks the traced layer: in every step of the schedule, nothing the other micro-batch computes
    there reads what that step's dispatch or combine delivers, so a scheduler may overlap them (the
    GPU compile check, tests/gpu, shows that XLA does)."""
    _with(net, schedule)
    graphdef, stacked = nnx.split(net.moe_layers)
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
    B, S = 16, 4
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    cos, sin = rope_cos_sin(positions, net.config)
    cache = DenseCache(jnp.zeros((1, B, S, 48), jnp.float32))

    def run(x):
        return overlapped_layer(layer, x, cos, sin, cache, 0, positions, causal_mask(positions, S), absorbed, schedule)

    jaxpr = jax.make_jaxpr(run)(jnp.zeros((B, S, 64), jnp.float32)).jaxpr
    _with(net, "none")
    checked = 0
    for step in SCHEDULES[schedule].steps:
        for mb, collective in [(m, n) for m, n in step if n in ("dispatch", "combine")]:
            beside = [n for m, n in step if m != mb]
            tainted = set()
            for e in jaxpr.eqns:  # eqns are in program order: propagate taint forward
                scope = str(e.source_info.name_stack)
                if f"mb{mb}/{collective}" in scope and "shard_map" in e.primitive.name:
                    tainted.update(e.outvars)
                elif any(not isinstance(v, Literal) and v in tainted for v in e.invars):
                    tainted.update(e.outvars)
                if any(f"mb{1 - mb}/{n}" in scope for n in beside):
                    assert not any(not isinstance(v, Literal) and v in tainted for v in e.invars), (step, e)
                    checked += 1
    assert checked > 20, checked


def test_balanced_slots_even_out_the_halves():
    costs = [100, 1, 1, 50, 49, 2, 3]
    slots = balanced_slots(costs, 8)
    assert sorted(slots) == sorted(set(slots)) and all(0 <= s < 8 for s in slots)
    first = sum(c for c, s in zip(costs, slots) if s < 4)
    second = sum(costs) - first
    assert abs(first - second) <= 2  # {100, 2, 1} vs {50, 49, 3, 1}


def test_engine_with_overlap_matches_without(net, tmp_path):
    path = tmp_path / "m"
    save_safetensors(net, path)
    # Every sequence (prompt + output <= 12 tokens) fits one block: one page-table width, so each engine
    # compiles one prefill and one decode program.
    serving = {"block_size": 16, "max_model_len": 64, "decode_batch": [4], "prefill_rows": [2], "prefill_tokens": [16]}
    prompts = [[5, 9, 13, 2, 7], [8, 4], [60, 61, 62, 63, 1, 2], [3, 3, 3]] * 4
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    plain = LLM(path, deployment=dataclasses.replace(EXACT, serving=serving)).generate(prompts, params)
    over = LLM(path, deployment=dataclasses.replace(EXACT, overlap="auto", serving=serving)).generate(prompts, params)
    assert [o.token_ids for o in over] == [o.token_ids for o in plain]


def _bench_overlap():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_overlap", Path(__file__).resolve().parents[1]
                                                  / "scripts" / "bench_overlap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hlo_summary_finds_async_pairs_and_the_compute_inside():
    """CPU sibling of the GPU check below: the HLO reader on a hand-written scheduled program."""
    text = "\n".join([
        "%a2a-start = (f32[8]) all-to-all-start(f32[8] %x), replica_groups={}",
        "%fusion.1 = f32[8] fusion(f32[8] %y), kind=kLoop",
        "%dot.2 = f32[8,8] dot(f32[8,8] %p, f32[8,8] %q)",
        "%a2a-done = f32[8] all-to-all-done(%a2a-start)",
        "%sync = f32[8] all-to-all(f32[8] %z)",
    ])
    assert _bench_overlap().hlo_summary(text) == {"all_to_all_sync": 1, "all_to_all_async_pairs": 1,
                                                  "compute_ops_inside_pairs": [2]}


def test_timeline_model_never_beats_the_critical_path():
    bench = _bench_overlap()
    m = bench.layer_model(attn_a=100, attn_b=50, experts=80, dispatch=120, combine=200)
    assert m["sequential_us"] == 2 * (100 + 50 + 80 + 120 + 200)
    # two micro-batches on two streams: at least all compute, at least all network, at most sequential
    for key in ("two_batch_us", "five_stage_us"):
        assert max(2 * 230, 2 * 320) <= m[key] < m["sequential_us"]
    models = bench.deepseek_models()
    assert models["decode_ep144"]["gain_two_batch"] > 1 and models["prefill_ep32"]["gain_two_batch"] > 1


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="async collectives are a GPU compilation (XLA:CPU runs them synchronously)")
def test_gpu_hlo_has_async_all_to_all_with_compute_inside(net):
    from model.transformer import method_jit
    _with(net, "two_batch")
    graphdef, state = nnx.split(net)
    tokens = jnp.zeros((16, 8), jnp.int32)
    text = method_jit(net.compiler_options).lower(graphdef, state, "_logits_full", tokens).compile().as_text()
    _with(net, "none")
    summary = _bench_overlap().hlo_summary(text)
    assert summary["all_to_all_async_pairs"] > 0 and max(summary["compute_ops_inside_pairs"]) > 0
