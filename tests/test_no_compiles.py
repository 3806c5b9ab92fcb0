"""No XLA compilation after warm-up, whatever serving does: live EPLB rebalances (one expert-move
program, the placement its data), KV hand-overs between any pair of ranks, MTP drafts verified in
every decode step, requests with and without a grammar, penalties, logprobs or temperature in one
batch, a resize back to a size served before (and rebalances and hand-overs there). The counter is
process-wide (serving/stats.py: jax.monitoring's backend-compile events), so nothing that compiles
escapes it. EP capacity overflow escalation: tests/test_server_overflow.py, tests/test_engine.py."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from serving import LLM, SamplingParams
from serving.disagg import _send
from serving.kv_cache import copy_blocks
from serving.stats import xla_compilations

ROOT = Path(__file__).resolve().parents[1]
# one shape bucket per kind, one page per request: one context bucket
COMPACT = {"prefill_tokens": [64], "prefill_rows": [4], "decode_batch": [16], "max_model_len": 64, "block_size": 64}


def test_send_takes_its_pairing_as_data():
    """The cross-process hand-over's send: any pairing of devices, one program."""
    mesh = Mesh(np.array(jax.devices()), ("all",))
    n = mesh.size
    x = jax.device_put(np.arange(n * 3, dtype=np.float32).reshape(n, 3), NamedSharding(mesh, P("all")))
    rng = np.random.default_rng(0)
    for i in range(3):
        perm = rng.permutation(n)
        senders = perm[:n // 2]  # half the devices send, to distinct receivers
        pairs = np.full((n, 2), -1, np.int32)
        for src in senders:
            pairs[src, 0], pairs[perm[src], 1] = perm[src], src
        got = np.asarray(_send(x, pairs, mesh))
        want = np.zeros((n, 3), np.float32)
        for src in senders:
            want[perm[src]] = np.asarray(x)[src]
        np.testing.assert_array_equal(got, want)
        if i == 0:
            compiled = xla_compilations()
    assert xla_compilations() == compiled  # two more pairings: nothing compiled


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The cpu8-disagg deployment, compact, the decode slice rebalancing its experts every 2 steps."""
    raw = json.loads((ROOT / "configs/deploy/cpu8-disagg.json").read_text())
    for section in (raw["prefill"], raw["decode"]):
        section["serving"] = COMPACT
        section["dispatch"]["capacity_factors"] = [None]  # one EP capacity level: a third of the programs
    raw["decode"]["experts"].update(rebalance_interval=2, rebalance_threshold=1.0, rebalance_window=1)
    path = tmp_path_factory.mktemp("nocompile") / "disagg.json"
    path.write_text(json.dumps(raw))
    llm = LLM(deployment=path)
    llm.engine.warmup()
    return llm


def test_rebalances_and_hand_overs_after_warm_up_compile_nothing(served):
    before = xla_compilations()
    rng = np.random.default_rng(1)
    # the rows a step samples differently: greedy, sampled (top-k, top-p), penalties and logit_bias,
    # logprobs, a grammar's token mask (each a branch of the one compiled step, chosen by data)
    kinds = [dict(), dict(temperature=0.8, top_k=5, top_p=0.9, seed=3), dict(logprobs=2),
             dict(presence_penalty=0.5, repetition_penalty=1.2, logit_bias={7: 2.0}),
             dict(structured_outputs={"regex": "[0-9]{1,4}"}), dict(structured_outputs={"choice": ["yes", "no"]})]
    for wave in range(2):
        prompts = [rng.integers(2, 101, rng.integers(3, 50)).tolist() for _ in range(12)]
        params = [SamplingParams(max_tokens=6 + wave, ignore_eos="structured_outputs" not in kinds[i % 6],
                                 **kinds[i % 6]) for i in range(12)]
        outs = served.generate(prompts, params)
        assert all(o.finish_reason in ("stop", "length") for o in outs), [o.error for o in outs]
        assert all(len(o.token_ids) == 6 + wave for o, p in zip(outs, params) if p.ignore_eos)
    stats = served.stats()
    assert stats["eplb"]["rebalances"] >= 2  # experts really moved, several times
    assert stats["handover"]["requests"] == 24 and stats["decode"]["speculative"]["drafts"] > 0
    assert stats["xla_compilations"] == xla_compilations() == before, "compiled while serving"


def test_hand_over_between_every_pair_of_ranks_compiles_nothing(served):
    """Every (prefill rank, decode rank) pair at every block count a request can hand over (the copy
    rounds' widths), into blocks the decode scheduler lends for it: one program per width, warmed."""
    engine = served.engine
    p, d = engine.prefill.runner, engine.decode.runner
    before = xla_compilations()
    for n in range(1, p.max_blocks + 1):
        for dst in range(d.ranks):
            lent = engine.decode.scheduler.pools[dst].allocate(n)
            moves = [(src, list(range(n)), dst, lent) for src in range(p.ranks)]  # one round per source
            d.pool = copy_blocks(p.pool, p.cache_mesh, d.pool, d.cache_mesh, moves)
            engine.decode.scheduler.pools[dst].release(lent)
    jax.block_until_ready(d.pool)
    assert xla_compilations() == before


def test_resize_back_to_a_size_served_before_compiles_nothing(served):
    """The first visit to dp 2 warms it up (serving/elastic.py: the engine was warmed up); serving
    there, going back to 4 and to 2 again, with rebalances and hand-overs at each size, compiles none."""
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompts = [[5, 9, 13, 2, 7, 11], [8, 4, 3], [60, 61, 62, 63, 1, 2]]
    decode, rebalances = served.engine.decode, served.stats()["eplb"]["rebalances"]
    before = xla_compilations()
    served.resize(decode=2)
    assert decode.resizes[-1]["compilations"] > 0  # a new mesh: its programs, compiled now
    warmed = xla_compilations()
    assert warmed > before
    served.generate(prompts, params)
    served.resize(decode=4)
    served.generate(prompts, params)
    served.resize(decode=2)
    served.generate(prompts, params)
    served.resize(decode=4)
    served.generate(prompts, params)
    assert [r["compilations"] for r in decode.resizes[-3:]] == [0, 0, 0]
    assert served.stats()["eplb"]["rebalances"] > rebalances
    assert xla_compilations() == warmed
