"""The expert-parallel step compiled for 8 GPUs on this CPU machine (scripts/gpu_schedule.py): the
all-to-alls of both micro-batches are async and the other micro-batch's GEMMs or attention are
scheduled under them, so the two-batch and five-stage overlap cannot silently vanish from the program
(at DeepSeek-V3's shapes: docs/ARCHITECTURE.md, "The schedule as compiled")."""

import pytest

pytest.importorskip("jax_plugins.xla_cuda13", reason="needs jax's CUDA plugin: run scripts/test_gpu_compile.sh")

import gpu_schedule  # noqa: E402


@pytest.fixture(scope="module", params=["prefill", "decode"])
def schedule(request):
    compiled, meta = gpu_schedule.compile_step(request.param, "small", 8, "h100", "auto")
    return gpu_schedule.report(compiled, meta)


def test_the_other_micro_batch_computes_under_the_expert_all_to_alls(schedule):
    assert schedule["overlap"] == "auto" and schedule["transport"] == "ragged"
    assert schedule["overlapped_share"] >= 0.9, [
        (c["micro_batch"], c["stage"], c["bytes"], c["between"]) for c in schedule["collectives"]
        if "all-to-all" in c["kind"]]


def test_one_payload_all_to_all_per_dispatch_and_per_combine(schedule):
    """Rows, expert ids, gate weights and scales travel in one buffer: per micro-batch and layer one
    ragged all-to-all each way (and the R counts a dispatch learns its receive sizes from); the last
    layer's lagging combine runs once more after the layer loop. None of them synchronous."""
    expert = [c for c in schedule["collectives"] if "all-to-all" in c["kind"]]
    assert all(c["async"] for c in expert), expert
    ragged = [c for c in expert if c["kind"] == "ragged-all-to-all"]
    by_stage = {}
    for c in ragged:
        by_stage[c["stage"]] = by_stage.get(c["stage"], 0) + c["runs"]
    layers = 2  # the small model's MoE layers
    assert by_stage == {"dispatch": 2 * layers, "combine": 2 * layers + 1}, by_stage
    counts = [c for c in expert if c["kind"] == "all-to-all"]
    assert all(c["bytes"] <= 8 * 4 for c in counts) and sum(c["runs"] for c in counts) == 2 * layers


def test_routing_gathers_nothing(schedule):
    """The gate runs where the tokens are: no collective comes from a MoE layer's routing."""
    assert not [c for c in schedule["collectives"] if c["stage"] == "route"]


def test_every_kernel_runs_on_its_own_ranks_rows(schedule):
    """Each custom-call kernel outside the EP stages (FP8 projections, the absorbed per-head GEMMs, prefill
    attention; decode attention per rank over its pages) runs in one shard_map on each rank's rows
    (model/kernels/registry.py per_rank): XLA gathers no rank's rows to run one. The only collectives left
    besides the expert all-to-alls are the overflow flag's (a 1-byte all-reduce)."""
    other = [c for c in schedule["collectives"] if "all-to-all" not in c["kind"]]
    assert all(c["kind"] == "all-reduce" and c["bytes"] <= 8 for c in other), [
        (c["kind"], c["stage"], c["bytes"]) for c in other]
    assert schedule["sync_collectives"] <= 1
