"""The scheduler's two workloads for scripts/bench_engine.py (--workload mixed | concurrency).

mixed: `--batch` streams decode while `--arrivals` prompts of `--arrival-len` tokens arrive, one every
`--arrival-every` engine steps: the inter-token latency (ITL) of the running streams, the TTFT of
the arrivals, and the steps that left a running stream without a token. Two rounds with fresh
random prompts (no prefix-cache hits): the first compiles what the workload runs, the second is
measured.

concurrency: the KV pool holds two full-context requests per rank; 64 of the demo's questions run
with max_tokens = the context left, then with max_tokens = 16: the most requests running at once,
the engine steps, and whether the outputs are prefix-equal (issue 30's done-when check).

Both use only the engine's public surface (add_request, step, its events), so the same file
measures an older engine: `PYTHONPATH=<its checkout> python scripts/bench_engine.py ...`.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np


def _pct(xs, q) -> float | None:
    return 1e3 * float(np.percentile(xs, q)) if len(xs) else None


def mixed(args, llm_for) -> dict:
    """llm_for(deployment) -> LLM. Returns the measured round's figures."""
    from serving import SamplingParams
    from serving.runner import bucket
    from sharding.deployment import Deployment
    dep = Deployment.from_json(args.deployment)
    s = dep.serving
    steps = args.arrivals * args.arrival_every
    stream_tokens = (steps + 64) * (1 + (args.speculative_tokens or 1))  # outlives the measured steps
    per_rank = -(-args.batch // dep.dp) + -(-args.arrivals // dep.dp)
    context = max(args.prompt_len + stream_tokens, args.arrival_len + args.arrival_tokens)
    dep = dataclasses.replace(dep, serving=dataclasses.replace(
        s, decode_batch=(bucket(per_rank, s.decode_batch),), prefill_tokens=(16, 256), prefill_rows=(1, 4),
        max_model_len=2 ** math.ceil(math.log2(context))))
    llm = llm_for(dep)
    engine, vocab = llm.engine, llm.engine.net.config.vocab_size
    rng = np.random.default_rng(0)
    result = None
    for _ in range(2):  # the first round compiles what the workload runs
        result = _mixed_round(engine, rng, vocab, args, steps,
                              SamplingParams(max_tokens=stream_tokens, ignore_eos=True),
                              SamplingParams(max_tokens=args.arrival_tokens, ignore_eos=True))
        for req in list(engine.requests.values()):
            engine.abort(req.id)
    result["deployment"] = dep.name
    return result


def _mixed_round(engine, rng, vocab, args, steps, stream_params, arrival_params) -> dict:
    streams = {engine.add_request(rng.integers(2, vocab, args.prompt_len).tolist(), stream_params).id
               for _ in range(args.batch)}
    while engine.scheduler.waiting or any(r.in_prefill for rank in engine.scheduler.running for r in rank):
        engine.step()
    compiled = engine.compilations
    last = dict.fromkeys(streams, time.perf_counter())
    itl, ttft, arrived, stalled, step, itl_steps = [], [], {}, 0, 0, []
    tainted, compiling_steps, seen = set(), 0, dict.fromkeys(streams, 0)
    before = dict(engine.counters)
    while step < steps or len(ttft) < args.arrivals:
        if step % args.arrival_every == 0 and len(arrived) < args.arrivals:
            req = engine.add_request(rng.integers(2, vocab, args.arrival_len).tolist(), arrival_params)
            arrived[req.id] = time.perf_counter()
        live = [r for r in streams if engine.requests.get(r) is not None]
        compiled_before = engine.compilations
        waiting = {r for r in arrived if r in engine.requests and not engine.requests[r].output}  # (no token yet)
        events = engine.step()
        now, got = time.perf_counter(), set()
        # a step that compiled (a shape or EP capacity level the first round missed) is left out of the
        # wall-time figures, with every gap or wait spanning it, and counted
        compiled = engine.compilations != compiled_before
        compiling_steps += compiled
        if compiled:
            tainted |= waiting
        for e in events:
            rid = e.request.id
            if rid in streams and e.new_tokens:
                if not compiled:
                    itl.append(now - last[rid])
                itl_steps.append(step + 1 - seen[rid])
                last[rid], seen[rid] = now, step + 1
                got.add(rid)
            elif rid in arrived and e.new_tokens and len(e.request.output) == len(e.new_tokens):
                if rid not in tainted:
                    ttft.append(now - arrived[rid])
        if compiled:
            last = dict.fromkeys(streams, now)
        stalled += any(r not in got for r in live)
        step += 1
    return {"steps": step, "steps_leaving_a_stream_without_a_token": stalled,
            "itl_ms": {"p50": _pct(itl, 50), "p99": _pct(itl, 99), "max": _pct(itl, 100)},
            "itl_steps": {"p50": float(np.percentile(itl_steps, 50)), "p99": float(np.percentile(itl_steps, 99)),
                          "max": int(max(itl_steps))},
            "steps_that_compiled_left_out_of_ms_figures": compiling_steps,
            "ttft_samples": len(ttft),
            "ttft_ms": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99), "max": _pct(ttft, 100)},
            "streams": args.batch, "arrivals": args.arrivals, "arrival_len": args.arrival_len,
            "arrival_every_steps": args.arrival_every,
            "compilations_during_measurement": engine.compilations - compiled,
            "preemptions": engine.counters.get("preemptions", 0) - before.get("preemptions", 0),
            "mixed_steps": engine.counters.get("mixed_steps", 0) - before.get("mixed_steps", 0)}


def concurrency(args, llm_for, questions, model_dir) -> dict:
    """The done-when check: a pool for two full-context requests per rank."""
    from model import ModelConfig
    from serving import SamplingParams
    from sharding.deployment import Deployment
    cfg = ModelConfig.from_json(model_dir / "config.json")
    dep = Deployment.from_json(args.deployment)
    s = dep.serving
    context = s.max_model_len or cfg.max_position_embeddings  # (before and after this issue: the tiny model's)
    layers = cfg.num_hidden_layers + (1 if cfg.num_nextn_predict_layers and not args.no_speculative else 0)
    per_block = layers * s.block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # float32 on CPU
    want = 2 * -(-context // s.block_size)
    dep = dataclasses.replace(dep, serving=dataclasses.replace(s, kv_cache_mb=want * per_block / 2 ** 20))
    llm = llm_for(dep)
    engine = llm.engine
    assert engine.scheduler.blocks_per_rank == want, (engine.scheduler.blocks_per_rank, want)
    prompts = [llm._ids(q) for q in questions(64, 0)]
    runs = {}
    for name in ("context_left", "max_tokens_16"):
        outs, most, steps = [], 0, 0
        reqs = [engine.add_request(p, SamplingParams(max_tokens=context - len(p) if name == "context_left" else 16))
                for p in prompts]
        while not engine.idle:
            engine.step()
            steps += 1
            most = max(most, sum(len(r) for r in engine.scheduler.running))
        outs = [r.output for r in reqs]
        runs[name] = {"max_running": most, "steps": steps, "outputs": outs}
    a, b = runs["context_left"], runs["max_tokens_16"]
    prefix_equal = all(x[:len(y)] == y or y[:len(x)] == x for x, y in zip(a["outputs"], b["outputs"]))
    return {"deployment": dep.name, "context": context, "kv_blocks_per_rank": want, "requests": len(prompts),
            **{f"{k}_{n}": runs[n][k] for n in runs for k in ("max_running", "steps")},
            "concurrency_ratio": a["max_running"] / b["max_running"], "steps_ratio": a["steps"] / b["steps"],
            "prefix_equal_outputs": prefix_equal,
            "mean_output_tokens": float(np.mean([len(o) for o in a["outputs"]]))}
