"""Background warm-up (serving/warmup.py): the server is healthy and serves once the cover-all shape
of each step kind is compiled, padding batches up to it; the other shape buckets compile on a thread
while requests are served, and the engine thread compiles nothing, before or after."""

import pytest

from serving import LLM
from serving.buckets import Buckets
from serving.server import create_app
from serving.warmup import Warmup
from server_util import TINY_MODEL, serving, value, write_deployment
from sharding.deployment import ServingConfig

# EP over 2 ranks, one capacity level, page tables of 1 or 2 blocks: 2 prefill + 4 decode shapes
DEPLOYMENT = {"mesh": {"dp": 2, "tp": 1}, "experts": {"redundant": 0}, "dispatch": {"capacity_factors": [None]},
              "serving": {"block_size": 16, "prefill_tokens": [16], "prefill_rows": [1], "decode_batch": [1, 4],
                          "max_model_len": 32, "kv_cache_mb": 4}}


def test_a_batch_runs_the_smallest_ready_shape_that_holds_it():
    b = Buckets(ServingConfig(prefill_tokens=(16, 64), prefill_rows=(1, 4), decode_batch=(1, 4, 16), block_size=16),
                drafts=1, max_blocks=16, levels=3)
    assert b.context == (1, 2, 4, 8, 16)
    shapes = b.shapes(("prefill", "decode"))
    assert len(shapes) == len(set(shapes)) == 2 * (5 + 4) + 3 * 5  # a 64-token chunk needs >= 2 blocks
    first, rest = b.plan(("prefill", "decode"))
    covers = [("decode", 16, 2, 16), ("prefill", 4, 64, 16)]
    assert b.covers == covers and first == [(2, c) for c in covers]  # the last level: nothing overflows there
    assert rest[:4] == [(0, c) for c in covers] + [(1, c) for c in covers]
    assert rest[4:6] == [(2, ("decode", 1, 2, 16)), (0, ("decode", 1, 2, 1))]  # each shape at the last level first
    # raised levels run the widest page table: 33 shapes at level 0, 2 x 7 rows x tokens above it
    assert len(first + rest) == len(set(first + rest)) == 33 + 2 * (2 * 2 + 3)
    assert b.fit("decode", 3, 2, 5) == ("decode", 4, 2, 8) and b.fit("decode", 3, 2, 5, 1) == ("decode", 4, 2, 16)
    b.ready = frozenset(first)
    assert b.fit("decode", 3, 2, 5, 2) == ("decode", 16, 2, 16)  # padded up to the cover-all
    assert b.fit("prefill", 1, 10, 1, 2) == ("prefill", 4, 64, 16)
    assert b.down_level(2) == 2  # no lower level's cover-all shapes yet: stay
    b.ready |= {(0, c) for c in covers}
    assert b.down_level(2) == 0 and b.fit("decode", 3, 2, 5) == ("decode", 16, 2, 16)
    assert b.retry_level(("decode", 16, 2, 16), 0) == 2  # level 1 not ready yet: the last
    b.ready |= {(0, ("decode", 4, 2, 16)), (0, ("decode", 1, 2, 8)), (2, ("decode", 1, 2, 16))}
    assert b.fit("decode", 3, 2, 5) == ("decode", 16, 2, 16)  # (4, 2, 16) has no program at the last level
    assert b.fit("decode", 1, 2, 2) == ("decode", 1, 2, 8)  # fewest padded rows first, then the table
    b.ready |= {(1, c) for c in covers} | {(2, ("decode", 4, 2, 16))}
    assert b.fit("decode", 3, 2, 5) == ("decode", 4, 2, 16) and b.down_level(2) == 1
    assert b.retry_level(("decode", 4, 2, 16), 0) == 2 and b.retry_level(("decode", 16, 2, 16), 0) == 1
    b.ready = frozenset({(0, ("decode", 1, 2, 1))})
    with pytest.raises(RuntimeError, match="no compiled decode program"):
        b.fit("decode", 2, 2, 1)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(TINY_MODEL, deployment=write_deployment(tmp_path_factory.mktemp("warmup") / "d.json", DEPLOYMENT))


def test_healthy_and_serving_before_the_background_compiles_finish(llm):
    engine, runner = llm.engine, llm.engine.runner
    runner.warming = warming = Warmup(runner, ("prefill", "decode"))
    warming.run(background=True)  # the cover-all shapes now; the thread not started yet
    assert warming.ready == 2 and warming.total == 6 and not warming.done
    compiled = engine.compilations
    prompt = dict(model="jaxseek-tiny", prompt="sort 4321=", max_tokens=6, temperature=0,
                  extra_body={"ignore_eos": True})
    with serving(create_app(llm, "jaxseek-tiny")) as server:
        health = server.http.get("/health")
        assert health.status_code == 200
        assert health.json()["warmup"] | {"seconds": 0} == {"done": False, "programs_ready": 2, "programs": 6,
                                                            "background_compiled": 0, "background_loaded": 0,
                                                            "seconds": 0, "error": None}
        padded = [server.client.completions.create(**prompt).choices[0].text for _ in range(2)]
        assert engine.compilations == compiled  # every step ran a ready shape, padded up
        metrics = server.metrics()
        assert value(metrics, "jaxseek_warmup_programs_ready") == 2 and value(metrics, "jaxseek_warmup_programs") == 6
        warming.start()
        during = server.client.completions.create(**prompt).choices[0].text  # while the thread compiles
        assert warming.join(timeout=900) and warming.error is None
        assert server.http.get("/health").json() == {"status": "ok"}  # the detail only while warm-up is under way
        assert warming.progress()["programs_ready"] == 6 and warming.compiled == 4
        assert runner.buckets.ready is None  # batches run their own shape again
        exact = server.client.completions.create(**prompt).choices[0].text
        assert value(server.metrics(), "jaxseek_warmup_programs_ready") == 6
    assert padded == [exact, exact] and during == exact  # padding changes no token
    # what compiled after the cover-all shapes is the warm-up thread's four programs: nothing on the engine thread
    assert engine.compilations == compiled + 4
