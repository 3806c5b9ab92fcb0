"""The scheduler as vLLM v1 runs it (serving/scheduler.py): KV blocks on demand, recompute
preemption that changes no output, mixed steps (every running decode gets its token while prompts
prefill in chunks under the token budget), and max_tokens reserving nothing."""

import numpy as np
import pytest

from hf_reference import make_checkpoint, tiny_config
from serving import LLM, SamplingParams
from sharding.deployment import Deployment

CONTEXT, BS = 32, 4
SERVING = {"block_size": BS, "prefill_tokens": [8], "prefill_rows": [4], "decode_batch": [8],
           "max_model_len": CONTEXT, "kv_dtype": "fp32"}
GREEDY = dict(ignore_eos=True)


def pool_mb(blocks: int, cfg) -> float:
    """kv_cache_mb holding exactly `blocks` blocks of this model (fp32 latent rows, every layer)."""
    return blocks * cfg.num_hidden_layers * BS * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 / 2 ** 20


def deployment(blocks: int, dp: int = 1, **serving) -> Deployment:
    cfg = tiny_config()
    return Deployment(name=f"sched-dp{dp}", dp=dp, serving={**SERVING, "kv_cache_mb": pool_mb(blocks, cfg), **serving})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("sched")
    make_checkpoint(path, tiny_config(), seed=3)
    return path


@pytest.fixture(scope="module")
def small(ckpt):
    """A pool of two full-context requests (2 x 8 blocks) on one rank."""
    llm = LLM(ckpt, deployment=deployment(2 * CONTEXT // BS))
    assert llm.engine.scheduler.blocks_per_rank == 16
    return llm


PROMPTS = [[5 + i, 9, 13, 2 + i, 7, 30 - i] for i in range(4)]  # 6 tokens: 2 blocks each at admission


def alone(llm, prompts, params):
    """Each request served by itself (no pool pressure: one request fits an empty rank)."""
    out, before = [], llm.engine.counters["preemptions"]
    for p in prompts:
        out.append(llm.generate([p], params)[0].token_ids)
    assert llm.engine.counters["preemptions"] == before
    return out


def run(engine, prompts, params, watch=None):
    """All at once through the engine; -> (requests, per-request event tokens, max running, steps)."""
    reqs = [engine.add_request(p, params) for p in prompts]
    streamed, most, steps = {r.id: [] for r in reqs}, 0, 0
    while not engine.idle:
        events = engine.step()
        steps += 1
        most = max(most, sum(len(r) for r in engine.scheduler.running))
        for e in events:
            streamed[e.request.id] += e.new_tokens
        if watch:
            watch(events)
    return reqs, [streamed[r.id] for r in reqs], most, steps


def test_preemption_recompute_changes_no_output_and_max_tokens_reserves_nothing(small):
    """max_tokens = the context left: all four run at once (the old worst-case reservation fitted
    two), the pool runs out as they grow, the latest admitted are preempted and recomputed, and every
    output and stream is token-for-token the one each request gets alone."""
    engine = small.engine
    long = SamplingParams(max_tokens=CONTEXT, **GREEDY)  # capped at the context left
    reference = alone(small, PROMPTS, long)
    preempted_at = []  # (request, tokens it had streamed when preempted)
    engine.scheduler.on_preempt = lambda r, f=engine.scheduler.on_preempt: (preempted_at.append((r.id, len(r.output))),
                                                                             f(r))
    before = engine.counters["preemptions"]
    reqs, streamed, most, _ = run(engine, PROMPTS, long)
    assert most == len(PROMPTS)
    assert engine.counters["preemptions"] - before == len(preempted_at) > 0
    assert any(n > 0 for _, n in preempted_at)  # preempted mid-stream, not only before its first token
    assert [r.output for r in reqs] == streamed == reference  # no repeated or missing token
    assert all(len(o) == CONTEXT - len(p) for o, p in zip(reference, PROMPTS))
    pool = engine.scheduler.pools[0]
    assert pool.refs.sum() == 0 and pool.available == pool.num_blocks
    short = SamplingParams(max_tokens=4, **GREEDY)
    reqs, _, most_short, _ = run(engine, PROMPTS, short)
    assert most_short == most and [r.output for r in reqs] == [o[:4] for o in reference]
    from serving.metrics import ServerMetrics, engine_snapshot
    text = ServerMetrics().render(engine_snapshot(engine)).decode()
    assert f"jaxseek_preemptions_total {float(engine.counters['preemptions'])}" in text


def test_async_scheduling_changes_no_greedy_output(small):
    """Async scheduling (step N + 1 dispatched before step N is read, its tokens taken on the device)
    against the synchronous loop, both under pool pressure (preemption mid-stream), with prompts and
    max_tokens of mixed lengths, a stop token that ends a request one step before the host knows it
    (its row in the next step wasted), and a request aborted while a step for it runs: every output,
    stream and finish reason the same."""
    engine = small.engine
    prompts = PROMPTS + [list(range(3, 20)), [41, 42]]
    reference = alone(small, PROMPTS[:1], SamplingParams(max_tokens=8, **GREEDY))[0]
    params = [SamplingParams(max_tokens=CONTEXT, **GREEDY), SamplingParams(max_tokens=5, **GREEDY),
              SamplingParams(max_tokens=CONTEXT, **GREEDY), SamplingParams(max_tokens=11, **GREEDY),
              SamplingParams(max_tokens=9, **GREEDY), SamplingParams(max_tokens=CONTEXT, **GREEDY)]
    params[0] = SamplingParams(max_tokens=CONTEXT, stop_token_ids=(reference[5],), **GREEDY)

    def serve(asynchronous: bool):
        engine.async_scheduling, before = asynchronous, engine.counters["preemptions"]
        reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        streamed, overlapped, steps = {r.id: [] for r in reqs}, 0, 0
        while not engine.idle:
            for e in engine.step():
                streamed[e.request.id] += e.new_tokens
            steps += 1
            overlapped += engine._inflight is not None  # a step left running on the device
            if len(reqs[-1].output) == 2 and reqs[-1].finish_reason is None:
                engine.abort(reqs[-1].id)
        pool = engine.scheduler.pools[0]
        assert pool.refs.sum() == 0 and pool.available == pool.num_blocks
        assert not engine.runner.inputs.held  # every token slot given back
        return ([(r.output, r.finish_reason) for r in reqs], [streamed[r.id] for r in reqs],
                engine.counters["preemptions"] - before, overlapped)

    try:
        sync, async_ = serve(False), serve(True)
    finally:
        engine.async_scheduling = engine.cfg.async_scheduling
    assert sync[2] > 0 and async_[2] > 0  # both preempted
    assert sync[3] == 0 and async_[3] > 0
    assert async_[:2] == sync[:2]
    stop = reference.index(reference[5]) + 1
    assert sync[0][0] == (reference[:stop], "stop") and sync[0][-1] == (sync[1][-1], "abort")
    assert len(sync[1][-1]) == 2


def test_host_sends_per_decode_step_do_not_grow_with_context(small):
    """The persistent input batch: a decode step's host->device bytes (the packed arrays, the
    page-table entries written) are the same at a 6-token and a 24-token context; a request's page
    table is sent once, then a block at a time as its sequence crosses block boundaries."""
    import jax
    engine = small.engine
    inputs = engine.runner.inputs

    def decode_step_bytes(prompt):
        req = engine.add_request(prompt, SamplingParams(max_tokens=6, **GREEDY))
        sent, per_step = inputs.entries_sent, []
        while not engine.idle:
            before = inputs.bytes_sent
            engine.step()
            for part in engine._inflight or []:
                if part.batch.kind == "decode":
                    host = sum(a.nbytes for a in jax.tree.leaves(part.arrays[1:]) if isinstance(a, np.ndarray))
                    per_step.append(host + inputs.bytes_sent - before)
        return per_step, inputs.entries_sent - sent, len(req.blocks)

    short, long = decode_step_bytes(PROMPTS[0]), decode_step_bytes(list(range(3, 27)))
    assert len(short[0]) == len(long[0]) >= 5
    # the same bytes a step (more in a step whose sequence crosses a block boundary: its new block)
    assert set(short[0]) == set(long[0])
    assert short[1] == short[2] and long[1] == long[2] == 8  # each block id sent once


def test_decodes_get_a_token_every_step_while_long_prompts_prefill(small):
    """Two streams decode while two 20-token prompts arrive: a 10-token budget leaves 8 prompt tokens a
    step, so the prompts take several mixed steps, and no step leaves a running stream without a token."""
    engine = small.engine
    engine.async_scheduling = False  # (each step's tokens read in the same call: what this counts)
    params = SamplingParams(max_tokens=12, **GREEDY)
    first = [engine.add_request(p, params) for p in PROMPTS[:2]]
    engine.step()  # their prompts
    assert all(len(r.output) == 1 for r in first)
    engine.scheduler.budget = 10
    try:
        longs = [engine.add_request(list(range(3, 23)), SamplingParams(max_tokens=4, **GREEDY)),
                 engine.add_request(list(range(50, 70)), SamplingParams(max_tokens=4, **GREEDY))]
        mixed = 0
        while any(r.output == [] for r in longs):
            running = [r for r in first if r.finish_reason is None]
            before = {r.id: len(r.output) for r in running}
            engine.step()
            assert all(len(r.output) > before[r.id] for r in running)  # every running stream advanced
            mixed += engine.last_step["kind"] == "mixed"
        assert mixed >= 4  # 2 x 20 prompt tokens, 8 a step
        while not engine.idle:
            engine.step()
    finally:
        engine.scheduler.budget = engine.cfg.token_budget()
        engine.async_scheduling = engine.cfg.async_scheduling
    assert [r.output for r in first] == alone(small, PROMPTS[:2], params)
    assert [r.output for r in longs] == alone(small, [r.prompt for r in longs], SamplingParams(max_tokens=4, **GREEDY))


def test_prompt_that_cannot_fit_a_rank_is_refused(ckpt):
    """A pool smaller than one full context: the engine starts; a prompt beyond a rank's pool is
    refused in one sentence; one that fits is taken, its output bounded by what the rank holds."""
    llm = LLM(ckpt, deployment=deployment(5))  # 20 rows a rank, the context is 32
    with pytest.raises(ValueError, match=r"request big: a prompt of 24 tokens needs 6 KV blocks, more than a "
                                         r"rank's pool of 5 \(raise serving.kv_cache_mb\)"):
        llm.engine.add_request(list(range(2, 26)), SamplingParams(max_tokens=2), "big")
    req = llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=40, **GREEDY))
    assert req.max_tokens == 20 - len(PROMPTS[0]) + 1 and llm.engine.counters["rejected"] == 1


def test_preemption_with_disk_tier_restores_and_matches(ckpt, small, tmp_path):
    """With the disk tier on, a preempted request's prompt blocks evicted from the device pool come
    back from disk at re-admission; the outputs are the same as without preemption."""
    llm = LLM(ckpt, deployment=deployment(2 * CONTEXT // BS, disk_cache_dir=str(tmp_path / "kv")))
    long = SamplingParams(max_tokens=CONTEXT, **GREEDY)
    prompts = [[40 + i] * 9 + [i, 3] for i in range(4)]  # 11 tokens: 2 full prompt blocks each
    reqs, _, _, _ = run(llm.engine, prompts, long)
    c = llm.engine.counters
    assert c["preemptions"] > 0 and c["disk_cached_prompt_tokens"] > 0
    assert [r.output for r in reqs] == alone(small, prompts, long)
