"""Prefill/decode disaggregation and elastic capacity on the embedded model in FP8: the shipped cpu8
(mixed) and cpu8-disagg deployments (compact buckets) give the same greedy tokens as one device without MTP drafts
(they draft, as the embedded model has MTP weights; the second wave hits the prefix cache), the KV
hand-over never passes through the host, and resizing in the middle of a workload changes no token."""

import json
from pathlib import Path

import jax
import pytest

from serving import LLM, SamplingParams
from sharding.deployment import Deployment

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "add 12+7=19\nadd 30+4=34\nadd 5+61=66\n"  # shared by every prompt: two full KV blocks
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def prompts(n: int, seed: int) -> list[str]:
    return [PREFIX + f"add {(seed * 7 + i * 13) % 90}+{(i * 29 + seed) % 90}=" for i in range(n)]


# One shape bucket per kind; 16-token blocks, so the shared prefix fills two and the prefix cache
# finds them; a request fits 4 blocks. Every LLM here compiles only the few programs it reaches.
COMPACT = {"prefill_tokens": [64], "prefill_rows": [4], "decode_batch": [32], "max_model_len": 64, "block_size": 16}


@pytest.fixture(scope="module")
def plain():
    """The reference: one device, no MTP drafts, the same FP8 weights."""
    return LLM(deployment=Deployment(name="plain", dp=1, serving=COMPACT), speculative=None, quantization="fp8")


def compact(name: str, tmp: Path) -> Path:
    """A shipped deployment with the compact buckets: each resize to a new mesh then compiles a
    handful of programs instead of every bucket the workload reaches."""
    raw = json.loads((ROOT / "configs/deploy" / name).read_text())
    for section in ([raw["prefill"], raw["decode"]] if "prefill" in raw else [raw]):
        section["serving"] = COMPACT
    path = tmp / name
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    """(mixed, disaggregated) LLMs of the compact cpu8 and cpu8-disagg deployments, serving and
    resizing; in quantization fp8 (the FP8 weights and scales re-shard with the rest, the hand-over
    is the same)."""
    tmp = tmp_path_factory.mktemp("elastic")
    return (LLM(deployment=compact("cpu8.json", tmp), quantization="fp8"),
            LLM(deployment=compact("cpu8-disagg.json", tmp), quantization="fp8"))


def test_disaggregated_greedy_equals_mixed_and_plain_with_shared_prefixes(plain, elastic, monkeypatch):
    mixed, disagg = elastic  # (first in the module: their counters start here)
    engine = disagg.engine
    hand_over = engine._hand_over

    def host_free_hand_over():  # the KV blocks go device to device: reading one to the host raises
        with jax.transfer_guard_device_to_host("disallow"):
            hand_over()
    monkeypatch.setattr(engine, "_hand_over", host_free_hand_over)
    assert (engine.prefill.ranks, engine.decode.ranks) == (4, 4)
    assert {d.id for d in engine.prefill.mesh.devices.flat} == {0, 1, 2, 3}
    assert {d.id for d in engine.decode.mesh.devices.flat} == {4, 5, 6, 7}
    assert engine.prefill.net.n_physical_experts != engine.decode.net.n_physical_experts  # own redundancy
    for wave in (prompts(8, 1), prompts(8, 2)):  # the second wave finds the prefix cached
        ref, a, b = plain.generate(wave, PARAMS), mixed.generate(wave, PARAMS), disagg.generate(wave, PARAMS)
        assert [o.token_ids for o in a] == [o.token_ids for o in ref]
        assert [o.token_ids for o in b] == [o.token_ids for o in ref]
        assert all(len(o.token_ids) == 6 for o in b)
    assert all(o.cached_tokens >= 32 for o in b) and all(o.cached_tokens >= 32 for o in a)
    stats = disagg.stats()
    assert stats["handover"]["requests"] == 16 and stats["handover"]["blocks"] >= 16 * 3
    assert stats["generated_tokens"] == 16 * 6 and stats["input_tokens_cache_hit"] >= 8 * 32
    for name in ("prefill_core_attention", "prefill_input_tokens", "decode_kv_tokens", "decode_requests"):
        assert stats["balance"][name]["samples"] > 0 and stats["balance"][name]["overall"] >= 1.0
    assert stats["prefill"]["decode_steps"] == 0 and stats["decode"]["prefill_steps"] == 0
    assert stats["decode"]["speculative"]["drafts"] > 0 and mixed.stats()["speculative"]["drafts"] > 0
    from serving.metrics import EngineCollector, engine_snapshot  # what the HTTP server's /metrics reads
    collector = EngineCollector()
    collector.snapshot = engine_snapshot(engine)
    used = next(f for f in collector.collect() if f.name.endswith("kv_blocks_used"))
    assert len(used.samples) == 8  # 4 prefill + 4 decode ranks


def run(llm, texts, resizes: dict[int, dict]) -> list[list[int]]:
    """Serves the texts step by step, resizing at the given steps."""
    reqs = [llm.engine.add_request(llm._ids(t), PARAMS) for t in texts]
    step = 0
    while not llm.engine.idle:
        if step in resizes:
            llm.resize(**resizes[step])
        llm.engine.step()
        step += 1
    assert all(r.finish_reason == "length" for r in reqs)
    return [r.output for r in reqs]


def test_resize_down_and_up_mid_workload_changes_no_token(elastic):
    mixed, disagg = elastic
    texts = prompts(100, 3)
    reference = [o.token_ids for o in mixed.generate(texts, PARAMS)]
    assert run(mixed, texts, {3: {"dp": 4}, 6: {"dp": 8}}) == reference  # (MTP: a few steps in all)
    resizes = mixed.engine.resizes[-2:]
    assert [(r["from_dp"], r["to_dp"]) for r in resizes] == [(8, 4), (4, 8)]
    assert resizes[0]["migrated"] > 0  # requests really moved off the leaving ranks, KV and all
    assert mixed.engine.ranks == 8 and not mixed.spare
    # (the disaggregated slices resize down and up with requests in flight in the day test below)


def test_bad_resize_is_refused_in_one_sentence(elastic):
    mixed, disagg = elastic
    with pytest.raises(ValueError, match="24 physical experts per layer do not divide over EP5"):
        mixed.resize(dp=5)
    with pytest.raises(ValueError, match="needs 9 devices, 8 held and 0 spare"):
        mixed.resize(dp=9)
    with pytest.raises(ValueError, match=r"resize\(prefill=..., decode=...\)"):
        disagg.resize(dp=4)
    assert mixed.engine.ranks == 8 and mixed.generate(prompts(2, 4), PARAMS)[0].finish_reason == "length"


def test_engine_follows_the_capacity_plan_over_a_compressed_day(elastic):
    """24 planned hours, a few engine steps each: the slices resize to the planner's node counts
    (2 devices a node), the nodes freed at night become spare, and every request keeps its tokens."""
    mixed, disagg = elastic
    from serving.capacity import cosine_curve, follow, plan_day
    from serving.economics import Stats
    day = Stats(window_hours=24, gpus_per_node=2, average_nodes=1, input_tokens_cache_hit=1620,
                input_tokens_cache_miss=1620, output_tokens=24 * 3 * PARAMS.max_tokens)
    curve = cosine_curve(day, peak_to_mean=1.6, peak_hour=14)
    # a node serves 0.9 of an average hour: peak hours need 2 nodes per role, night hours 1
    plan = plan_day(curve, sum(curve.input_tokens) / 24 / 3600 / 0.9, sum(curve.output_tokens) / 24 / 3600 / 0.9, 4)
    assert min(plan.nodes) == 2 and max(plan.nodes) == 4
    texts, served, spare = prompts(80, 5), [], []
    queue = list(texts)
    reqs = []
    for hour in range(24):
        served.append(follow(disagg, plan, hour, gpus_per_node=2))
        spare.append(len(disagg.engine.spare))
        for _ in range(round(curve.output_tokens[hour] / PARAMS.max_tokens)):
            if queue:
                reqs.append(disagg.engine.add_request(disagg._ids(queue.pop(0)), PARAMS))
        for _ in range(3):  # the hour, compressed
            disagg.engine.step()
    while not disagg.engine.idle:
        disagg.engine.step()
    follow(disagg, plan, plan.nodes.index(max(plan.nodes)), 2)  # leave the fixture at full size
    assert served == [(p * 2, d * 2) for p, d in zip(plan.prefill_nodes, plan.decode_nodes)]
    assert [(disagg.engine.prefill.ranks, disagg.engine.decode.ranks)] == [(4, 4)]
    assert max(spare) == 4 and spare == [8 - 2 * n for n in plan.nodes]  # night: half the devices freed
    assert len(reqs) >= 60 and all(r.finish_reason == "length" for r in reqs)
    moved = [r["migrated"] for e in (disagg.engine.prefill, disagg.engine.decode) for r in e.resizes]
    assert sum(moved) > 0  # some shrink happened with requests in flight, which moved with their KV
    reference = mixed.generate(texts[:len(reqs)], PARAMS)
    assert [r.output for r in reqs] == [o.token_ids for o in reference]


def test_deepseek_production_layout_parses_and_is_refused_here_in_one_sentence():
    from sharding.deployment import Disaggregated, read
    dep = read(ROOT / "configs/deploy/deepseek-disagg.json")
    assert isinstance(dep, Disaggregated) and (dep.prefill.ep_size, dep.decode.ep_size) == (32, 144)
    assert dep.prefill.n_physical_experts(256) == 288 == dep.decode.n_physical_experts(256)
    with pytest.raises(ValueError, match=r"needs 176 devices \(32 prefill \+ 144 decode\), only 8 available"):
        LLM(deployment=ROOT / "configs/deploy/deepseek-disagg.json")
