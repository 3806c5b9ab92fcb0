"""serving.economics and scripts/cost_report.py: DeepSeek's published day reproduced from its inputs,
$ per million tokens from throughput, and bad records failing with one sentence naming file and field."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serving import economics
from serving.economics import EconomicsError

ROOT = Path(__file__).resolve().parents[1]
DAY = ROOT / "configs" / "economics" / "deepseek-2025-02-27.json"
SCRIPT = ROOT / "scripts" / "cost_report.py"


def _report(path=DAY) -> dict:
    record = economics.load(path)
    return economics.report(record.stats, record.prices, published=record.published)


def test_published_day_reproduced_to_rounding():
    """DeepSeek's own figures for the day (cost, theoretical revenue, margin), from its published inputs.
    (That the engine counts what it serves, which is what a real window's report rests on, is
    tests/test_engine.py's test_statistics_record_counts_what_was_served.)"""
    rep = _report()
    assert rep["cost_usd"] == pytest.approx(87_072, rel=1e-12)
    assert rep["revenue_usd"] == pytest.approx(562_027, rel=1e-3)
    assert math.floor(rep["margin_percent"]) == 545
    assert rep["margin_percent"] == pytest.approx(545.5, abs=0.1)
    assert rep["published"]["matches"]


def test_throughput_explains_the_average_node_count():
    phases = _report()["phases"]
    assert phases["prefill"]["average_nodes_needed"] == pytest.approx(608e9 / 86_400 / 73.7e3)
    assert phases["decode"]["average_nodes_needed"] == pytest.approx(168e9 / 86_400 / 14.8e3)
    need = phases["prefill"]["average_nodes_needed"] + phases["decode"]["average_nodes_needed"]
    assert need == pytest.approx(226.75, rel=1e-3)


def test_dollars_per_million_tokens_by_hand():
    # 1,000 tokens/s is 3.6M tokens per GPU-hour, so a $3.60 GPU-hour makes a million tokens cost $1.
    assert economics.dollars_per_million_tokens(1000, 3.6) == pytest.approx(1.0)
    # DeepSeek decode: 14.8k tokens/s per node / 8 GPUs = 1,850 -> 6.66M tokens per $2 GPU-hour.
    assert economics.dollars_per_million_tokens(1850, 2.0) == pytest.approx(2 / 6.66)
    assert _report()["phases"]["decode"]["usd_per_million_tokens"] == pytest.approx(2 / 6.66)


def test_gpu_seconds_equal_average_nodes():
    record = economics.load(DAY)
    counted = economics.Stats(window_hours=24, gpus_per_node=8, gpu_seconds=226.75 * 8 * 86_400,
                              input_tokens_cache_hit=342e9, input_tokens_cache_miss=266e9, output_tokens=168e9)
    assert economics.cost(counted, 2.0) == pytest.approx(economics.cost(record.stats, 2.0))
    assert "GPU-s / 3600" in economics.render(economics.report(counted, record.prices))


def test_margin_definition():
    assert economics.margin(100, 645) == pytest.approx(5.45)
    with pytest.raises(EconomicsError, match="'cost' must be > 0"):
        economics.margin(0, 10)


def _write(tmp_path, edit) -> Path:
    raw = json.loads(DAY.read_text())
    edit(raw)
    path = tmp_path / "day.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda r: r["prices"].update(per_million_output=-2.19), r"prices: 'per_million_output' must be >= 0, got -2.19"),
    (lambda r: r.pop("output_tokens"), r"required field 'output_tokens' is missing"),
    (lambda r: r.update(gpus_per_node="eight"), r"'gpus_per_node' must be an integer, got 'eight'"),
    (lambda r: r.update(gpus_per_node=8.5), r"'gpus_per_node' must be an integer, got 8.5"),
    (lambda r: r.update(input_tokens_cache_hit=True), r"'input_tokens_cache_hit' must be a number, got True"),
    (lambda r: r.update(decode_tokens_per_s_per_node=0), r"'decode_tokens_per_s_per_node' must be > 0, got 0"),
    (lambda r: r.update(gpu_seconds=1e9), r"give exactly one of 'average_nodes' and 'gpu_seconds'"),
    (lambda r: r.pop("average_nodes"), r"give exactly one of 'average_nodes' and 'gpu_seconds'"),
    (lambda r: r.update(average_node=226.75), r"unknown field 'average_node'"),
    (lambda r: r["published"].pop("margin_percent"), r"published: required field 'margin_percent' is missing"),
])
def test_bad_statistics_file(tmp_path, edit, message):
    path = _write(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}"):
        economics.load(path)


def test_not_json_and_missing_file(tmp_path):
    (tmp_path / "bad.json").write_text("{ nope")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        economics.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"absent\.json: file not found"):
        economics.load(tmp_path / "absent.json")


@pytest.mark.parametrize("tokens_per_s,price,message", [
    (0, 2.0, "'tokens_per_s_per_gpu' must be > 0, got 0"),
    (-5, 2.0, "'tokens_per_s_per_gpu' must be > 0, got -5"),
    (1000, -1, "'price_per_gpu_hour' must be >= 0, got -1"),
])
def test_bad_throughput_and_price(tokens_per_s, price, message):
    with pytest.raises(ValueError, match=message):
        economics.dollars_per_million_tokens(tokens_per_s, price)


def test_bad_throughput_file(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"decode_tokens_per_s_per_gpu": 0}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: 'decode_tokens_per_s_per_gpu' must be > 0"):
        economics.load_throughput(path)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_json_matches_report_and_text_shows_headlines():
    run = _cli(DAY, "--json")
    assert run.returncode == 0, run.stderr
    got, want = json.loads(run.stdout), _report()
    for key in ("gpu_hours", "cost_usd", "revenue_usd", "margin_percent"):
        assert got[key] == pytest.approx(want[key])
    assert got["published"]["matches"]
    text = _cli(DAY).stdout
    for figure in ("= $87,072", "= $562,100", "= 545.6%", "cut to a whole percent: 545%", "Actual revenue is"):
        assert figure in text


def test_cli_throughput_and_price_flags(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"prefill_tokens_per_s_per_gpu": 2000}))
    run = _cli(DAY, "--json", "--throughput-json", bench, "--decode-tok-s-per-gpu", 1000, "--gpu-hour", 3.6)
    assert run.returncode == 0, run.stderr
    rep = json.loads(run.stdout)
    assert rep["phases"]["decode"]["usd_per_million_tokens"] == pytest.approx(1.0)
    assert rep["phases"]["prefill"]["usd_per_million_tokens"] == pytest.approx(0.5)
    assert rep["cost_usd"] == pytest.approx(226.75 * 8 * 24 * 3.6)
    assert rep["published"] is None  # the published figures hold only at the file's own prices


def test_cli_errors_are_one_line(tmp_path):
    run = _cli(DAY, "--price-hit", -1)
    assert (run.returncode, run.stderr) == (2, "error: '--price-hit' must be >= 0, got -1.0\n")
    bare = _write(tmp_path, lambda r: r.pop("prices"))
    run = _cli(bare)
    assert run.returncode == 2 and f"{bare}: no 'prices' object" in run.stderr
    assert _cli(bare, "--gpu-hour", 2, "--price-hit", 0.14, "--price-miss", 0.55,
                "--price-output", 2.19).returncode == 0


def test_records_are_frozen():
    record = economics.load(DAY)
    with pytest.raises(AttributeError):
        record.stats.output_tokens = 0
