"""serving.capacity and scripts/plan_capacity.py: plans cover every hour's load with whole nodes and no
more, stay inside the cluster, free nodes at night; bad curves fail clearly; the shipped day runs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.capacity import HOURS, LoadCurve, average_need, cosine_curve, load_curve, plan_day
from serving.economics import EconomicsError, Stats

ROOT = Path(__file__).resolve().parents[1]
CURVE = ROOT / "configs" / "economics" / "diurnal-load.json"
SCRIPT = ROOT / "scripts" / "plan_capacity.py"
PREFILL, DECODE = 73.7e3, 14.8e3  # DeepSeek's tokens/s per H800 node
PUBLISHED_TOTALS = {"input_tokens_cache_hit": 342e9, "input_tokens_cache_miss": 266e9, "output_tokens": 168e9}

hourly = st.lists(st.floats(0, 1e12), min_size=HOURS, max_size=HOURS)


@settings(max_examples=150, deadline=None)
@given(hit=hourly, miss=hourly, out=hourly, prefill=st.floats(1e3, 1e5), decode=st.floats(1e2, 2e4),
       headroom=st.floats(1, 1.5), min_nodes=st.integers(0, 3))
def test_plan_covers_the_load_tightly_and_fits_the_cluster(hit, miss, out, prefill, decode, headroom, min_nodes):
    curve = LoadCurve(hit, miss, out)
    plan = plan_day(curve, prefill, decode, 10**7, headroom=headroom, min_nodes=min_nodes)
    for loads, nodes, per_node in ((curve.input_tokens, plan.prefill_nodes, prefill),
                                   (curve.output_tokens, plan.decode_nodes, decode)):
        for tokens, n in zip(loads, nodes):
            need = headroom * tokens / 3600  # tokens/s this hour must be served at
            assert n >= min_nodes
            assert n * per_node >= need * (1 - 1e-12)
            assert n == min_nodes or (n - 1) * per_node < need * (1 + 1e-12)  # one node fewer would not do
    assert min(plan.freed_nodes) >= 0
    if plan.peak_nodes > 0:  # (an idle day with min_nodes=0 needs no cluster at all)
        fitted = plan_day(curve, prefill, decode, plan.peak_nodes, headroom=headroom, min_nodes=min_nodes)
        assert fitted.nodes == plan.nodes and min(fitted.freed_nodes) == 0
    if plan.peak_nodes > 1:
        with pytest.raises(EconomicsError, match=r"hour \d\d:00 needs \d+ prefill \+ \d+ decode nodes"):
            plan_day(curve, prefill, decode, plan.peak_nodes - 1, headroom=headroom, min_nodes=min_nodes)
    for i in range(HOURS):  # an hour with less of both loads never holds more nodes
        for j in range(HOURS):
            if curve.input_tokens[i] <= curve.input_tokens[j] and curve.output_tokens[i] <= curve.output_tokens[j]:
                assert plan.freed_nodes[i] >= plan.freed_nodes[j]


@settings(max_examples=100, deadline=None)
@given(peak_to_mean=st.floats(1.2, 1.9), peak_hour=st.floats(0, 24), start_hour=st.integers(0, 23),
       scale=st.floats(0.1, 10))
def test_night_trough_frees_nodes_for_training(peak_to_mean, peak_hour, start_hour, scale):
    stats = Stats(window_hours=24, gpus_per_node=8, average_nodes=1,
                  **{key: scale * total for key, total in PUBLISHED_TOTALS.items()})
    curve = cosine_curve(stats, peak_to_mean=peak_to_mean, peak_hour=peak_hour, start_hour=start_hour)
    for key in PUBLISHED_TOTALS:
        assert sum(getattr(curve, key)) == round(getattr(stats, key))
    plan = plan_day(curve, PREFILL, DECODE, 10**6)
    load = curve.input_tokens
    trough, peak = load.index(min(load)), load.index(max(load))
    assert plan.freed_nodes[trough] > plan.freed_nodes[peak]
    assert plan.average_nodes >= sum(average_need(curve, PREFILL, DECODE))


@pytest.mark.parametrize("fields,message", [
    ({"output_tokens": [1.0] * 23}, r"'output_tokens' must be a list of 24 hourly token counts, got 23 values"),
    ({"input_tokens_cache_hit": 5}, r"'input_tokens_cache_hit' must be a list of 24 hourly token counts, got 5"),
    ({"input_tokens_cache_miss": [1.0] * 5 + [-1.0] + [1.0] * 18},
     r"'input_tokens_cache_miss\[5\]' must be >= 0, got -1"),
    ({"output_tokens": [1.0] * 23 + ["many"]}, r"'output_tokens\[23\]' must be a number, got 'many'"),
    ({"start_hour": 24}, r"'start_hour' must be a clock hour 0..23, got 24"),
    ({"peak_hour": 3}, r"unknown field 'peak_hour'"),
])
def test_bad_curve_file(tmp_path, fields, message):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({**json.loads(CURVE.read_text()), **fields}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}"):
        load_curve(path)


@pytest.mark.parametrize("kwargs,message", [
    ({"prefill_tokens_per_s_per_node": 0}, r"'prefill_tokens_per_s_per_node' must be > 0, got 0"),
    ({"decode_tokens_per_s_per_node": -14.8e3}, r"'decode_tokens_per_s_per_node' must be > 0, got -14800"),
    ({"cluster_nodes": 250}, r"hour 15:00 needs 118 prefill \+ 162 decode nodes, more than the cluster's 250"),
    ({"cluster_nodes": 300.5}, r"'cluster_nodes' must be an integer"),
    ({"headroom": 0.9}, r"'headroom' must be >= 1 \(it multiplies the load\), got 0.9"),
])
def test_bad_plan_arguments(kwargs, message):
    args = {"prefill_tokens_per_s_per_node": PREFILL, "decode_tokens_per_s_per_node": DECODE, "cluster_nodes": 300}
    with pytest.raises(ValueError, match=message):
        plan_day(load_curve(CURVE), **{**args, **kwargs})


def test_cosine_needs_a_sane_peak():
    stats = Stats(window_hours=24, gpus_per_node=8, average_nodes=1, **PUBLISHED_TOTALS)
    with pytest.raises(ValueError, match=r"'peak_to_mean' must be in \[1, 2\), got 2.5"):
        cosine_curve(stats, peak_to_mean=2.5, peak_hour=15.5)


def test_shipped_curve_is_the_published_day():
    curve = load_curve(CURVE)
    for key, total in PUBLISHED_TOTALS.items():
        assert sum(getattr(curve, key)) == total
    assert max(curve.input_tokens) / (sum(curve.input_tokens) / HOURS) == pytest.approx(278 / 226.75, rel=1e-9)
    assert curve.clock_hours[curve.input_tokens.index(max(curve.input_tokens))] == 15


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_shipped_plan_runs_draws_and_regenerates(tmp_path):
    # --write-cosine on a copy regenerates the shipped curve; the plan figures are those in docs/ECONOMICS.md
    copy, png = tmp_path / "curve.json", tmp_path / "day.png"
    run = _cli(copy, "--write-cosine", "--json", "--png", png)
    assert run.returncode == 0, run.stderr
    assert json.loads(copy.read_text()) == json.loads(CURVE.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    plan = json.loads(run.stdout)
    assert (plan["peak_nodes"], plan["average_nodes"], plan["node_hours"]) == (280, 228.0, 5472)
    assert sum(plan["average_need"].values()) == pytest.approx(226.86, abs=0.005)
    assert plan["economics"]["cost_usd"] == pytest.approx(5472 * 8 * 2.0)
    assert [h["freed_nodes"] for h in plan["hours"]][15] > [h["freed_nodes"] for h in plan["hours"]][3]
    text = _cli(CURVE, "--cluster-nodes", 278)
    assert text.returncode == 2 and "needs 118 prefill + 162 decode nodes, more than the cluster's 278" in text.stderr
