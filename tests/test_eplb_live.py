"""Live EPLB in the engine: experts move between devices mid-generation and no token changes (with MTP
drafting, against the engine without it)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tiny import save_tiny
from model.moe import default_placement
from serving import LLM, SamplingParams
from sharding.deployment import Deployment
from sharding.eplb import balancedness, logical_loads

BASE = Deployment(name="ep8", dp=8, redundant_experts=8, dispatch_dtype="fp32", combine_dtype="fp32",
                  serving={"block_size": 8, "max_model_len": 64, "decode_batch": [8], "prefill_rows": [4],
                           "prefill_tokens": [16]})
PROMPTS = [[5, 9, 13, 2, 7], [8, 4], [60, 61, 62, 63, 1, 2], [3, 3, 3], [100, 7], [9] * 9, [77, 78], [1, 50]]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("eplb")
    save_tiny(p, 5)
    return p


def test_live_rebalance_changes_no_token(path):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    fixed = LLM(path, deployment=BASE, speculative=None).generate(PROMPTS, params)
    # the random checkpoint has an MTP module: the rebalancing engine drafts (its drafts mostly rejected)
    llm = LLM(path, deployment=dataclasses.replace(BASE, rebalance_interval=3, rebalance_threshold=1.0))
    live = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in live] == [o.token_ids for o in fixed]
    assert llm.stats()["speculative"]["drafts"] > 0
    eplb = llm.stats()["eplb"]
    assert eplb["rebalances"] >= 2  # it really happened, mid-generation
    phy2log = np.asarray(llm.engine.net.moe_layers.mlp.phy2log[...])
    assert not np.array_equal(phy2log[0], default_placement(16, 24)["phy2log"])
    last = eplb["last"]
    assert last["mean_after"] < last["mean_before"]
    assert len(last["gpu_load_before"]) == 8 and abs(sum(last["gpu_load_before"]) - sum(last["gpu_load_after"])) < 1e-6
    # the maps the engine keeps agree with each other: every slot is listed under its expert
    mlp = llm.engine.net.moe_layers.mlp
    log2phy, logcnt = np.asarray(mlp.log2phy[...]), np.asarray(mlp.logcnt[...])
    for layer in range(len(phy2log)):
        for e in range(16):
            slots = log2phy[layer, e, :logcnt[layer, e]]
            assert (phy2log[layer, slots] == e).all()


def test_balancedness_report_in_stats(path):
    llm = LLM(path, deployment=BASE)
    llm.generate(PROMPTS[:4], SamplingParams(max_tokens=4, ignore_eos=True))
    eplb = llm.stats()["eplb"]
    load = np.asarray(llm.engine.expert_load)
    mlp = llm.engine.net.moe_layers.mlp
    expected = balancedness(logical_loads(load, mlp.phy2log[...], 16), mlp.phy2log[...], mlp.logcnt[...], 8)
    np.testing.assert_allclose(eplb["balancedness_per_layer"], expected)
    assert eplb["balancedness"] >= 1.0 and eplb["rebalances"] == 0


def test_eplb_report_script(tmp_path):
    import json
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "scripts/eplb_report.py", "--zipf", "1.0", "--deployment",
                          "configs/deploy/deepseek-decode-ep144.json", "--out", str(out), "--json"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["gpus"] == 144 and report["physical_experts"] == 288 and report["layers"] == 58
    assert report["balancedness_after"] < report["balancedness_before"]
    assert (tmp_path / "report.png").stat().st_size > 10_000
