"""Benchmark the serving engine's decode loop: throughput and host overhead per step.

Host overhead, measured two ways: (1) the engine's own bookkeeping time per step (scheduling and
building the batch arrays before the jitted call, advancing the requests after it); (2) a step's
wall time minus the same jitted step replayed on prebuilt arrays with block_until_ready, which
also charges the dispatch. On a shared CPU (2) is noisy: both cores also run the "device".

Nothing compiles while measuring: the deployment's serving buckets are narrowed to the ones this
workload uses (the step shapes are those of the full deployment) and Engine.warmup compiles each
at every EP capacity level the steps may move between.

    python scripts/bench_engine.py --batch 64 --steps 50 --json [--dtype bfloat16] [--no-speculative]
    python scripts/bench_engine.py --shapes issue31 --sweep 16x256,64x256,256x256,16x2048,64x2048,256x2048 --json
    python scripts/bench_engine.py --shapes issue31 --sweep 64x2048 --both-schedulings --json  # sync vs async
    python scripts/bench_engine.py --workload mixed --json        # streams decoding while prompts arrive
    python scripts/bench_engine.py --workload concurrency --json  # max_tokens reserving nothing
(the scheduler's workloads: scripts/bench_scheduler.py)

Per decode step it reports the wall time (`step_ms_median`), the device time (`device_step_ms_median`:
the compiled step alone, block_until_ready, on the arrays of the next batch) and the exposed host
time, their difference (`wall_minus_replay_ms`, also as `exposed_host_share` of the step).
--context C sets the prompt so that the measured steps run at about C tokens of context (prompt +
the tokens decoded before and during the measurement); --sweep BxC,... runs each (batch, context)
in a process of its own and prints the list; --both-schedulings runs each synchronously and with
async scheduling (--no-async-scheduling / --async-scheduling: one run's mode; the default is the
deployment's, async). Under async scheduling a step's wall time is one engine.step() call: it
dispatches step N + 1, then reads and lands step N. --shapes issue31: a random checkpoint of the shapes
issue 31 compares with the peer (scripts/bench_model.py; its 4,096-token context holds 2K prompts),
written once under --model-dir.

With MTP speculative decoding (on by default for a checkpoint with MTP weights) a step gives each
request 1 + its accepted drafts: the tokens counted are the tokens generated, and the acceptance
rate and tokens per step of the measured steps are reported. --prompts tasks uses the tiny model's
demo questions (what it was trained on: its drafts are accepted) instead of random token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def replay_ms(engine, repeats: int) -> float:
    """Median ms of the jitted decode step alone, on the arrays of the engine's next decode batch."""
    import jax
    import numpy as np
    engine.drain()  # (async scheduling: the step in flight lands first)
    batches = engine.scheduler.schedule()
    assert [b.kind for b in batches] == ["decode"], "the replay measures a decode step"
    batch = batches[0]
    arrays = engine.runner.pack(batch, engine.requests.__contains__)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(engine.runner.dispatch("decode", arrays))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def narrowed(path, batch: int, prompt_len: int, max_tokens: int):
    """The deployment with only the serving buckets this workload uses (the step shapes it runs are
    those of the full deployment): its decode bucket, its prompts' chunk and rows buckets, and a
    context just long enough for prompt + output, so warm-up compiles only what runs."""
    import dataclasses

    from serving.kv_cache import pow2
    from serving.runner import bucket
    from sharding.deployment import Deployment
    dep = Deployment.from_json(path)
    s = dep.serving
    per_rank = -(-batch // dep.dp)
    blocks = pow2(-(-(prompt_len + max_tokens) // s.block_size))
    return dataclasses.replace(dep, serving=dataclasses.replace(
        s, decode_batch=(bucket(per_rank, s.decode_batch),),
        prefill_rows=(bucket(min(per_rank, s.prefill_rows[-1]), s.prefill_rows),),
        prefill_tokens=tuple(t for t in s.prefill_tokens if t <= bucket(min(prompt_len, s.prefill_tokens[-1]),
                                                                          s.prefill_tokens)),
        max_model_len=blocks * s.block_size))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: the embedded tiny model)")
    ap.add_argument("--deployment", default=str(ROOT / "configs/deploy/cpu8.json"))
    ap.add_argument("--batch", type=int, default=64, help="concurrent requests (all decoding together)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50, help="measured decode steps (after warm-up)")
    ap.add_argument("--cpu-devices", type=int, default=8)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="weights, compute and KV cache (default: the LLM's, float32 on CPU)")
    ap.add_argument("--prompts", choices=("random", "tasks"), default="random",
                    help="random token ids, or the tiny model's demo questions (scripts/demo.py)")
    ap.add_argument("--context", type=int, help="tokens of context at the measured steps (sets --prompt-len)")
    ap.add_argument("--sweep", help="BATCHxCONTEXT,...: one run of each, in a process of its own")
    ap.add_argument("--shapes", choices=("issue31",), help="a random checkpoint of these shapes (bench_model.py)")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/jaxseek-bench-issue31"),
                    help="where --shapes writes its checkpoint (once)")
    ap.add_argument("--lazy", action="store_true",
                    help="skip Engine.warmup (every EP capacity level): the warm round compiles what it runs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workload", choices=("decode", "mixed", "concurrency"), default="decode")
    ap.add_argument("--arrivals", type=int, default=16, help="mixed: prompts arriving while the streams decode")
    ap.add_argument("--arrival-every", type=int, default=2, help="mixed: engine steps between arrivals")
    ap.add_argument("--arrival-len", type=int, default=200, help="mixed: tokens of an arriving prompt")
    ap.add_argument("--arrival-tokens", type=int, default=8, help="mixed: max_tokens of an arriving prompt")
    # the emulated devices must be set before serving is imported (its flags' helper lives there)
    devices = ap.parse_known_args(argv)[0].cpu_devices
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")
    os.environ.setdefault("PJRT_NPROC", str(2 * devices))
    from serving.api import add_scheduling_flags, add_speculative_flags
    add_speculative_flags(ap)
    add_scheduling_flags(ap)
    ap.add_argument("--both-schedulings", action="store_true",
                    help="--sweep: each (batch, context) synchronous, then with async scheduling")
    args = ap.parse_args(argv)
    if args.sweep:
        return sweep(args, argv if argv is not None else sys.argv[1:])

    import jax
    import numpy as np

    from serving import LLM, SamplingParams
    from serving.api import speculative_flag
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo import default_model, questions

    import jax.numpy as jnp
    if args.workload != "decode":
        import subprocess

        from bench_scheduler import concurrency, mixed

        def llm_for(dep):
            return LLM(args.model or default_model(), deployment=dep, speculative=speculative_flag(args),
                       dtype=getattr(jnp, args.dtype) if args.dtype else None)
        result = mixed(args, llm_for) if args.workload == "mixed" else \
            concurrency(args, llm_for, questions, Path(args.model or default_model()))
        import serving
        source = Path(serving.__file__).resolve().parents[1]
        result.update(workload=args.workload, serving_source=str(source), commit=subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
            device=jax.devices()[0].device_kind, load_average=os.getloadavg()[0])
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    # room for every measured step to give each request up to 1 + k tokens (MTP drafts accepted)
    max_tokens = (args.steps + 10) * (1 if args.no_speculative else 1 + (args.speculative_tokens or 1))
    if args.context:  # the measured steps run between context - (steps + 8) and context tokens
        args.prompt_len = args.context - (args.steps + 10)
    if args.shapes:
        from bench_model import issue31_checkpoint
        args.model = issue31_checkpoint(args.model_dir)
    # requests decode in the mixed steps while the last prompts prefill: room for those steps too, so
    # that every request still runs at the measured steps (the first prefilled: that much more context)
    first = narrowed(args.deployment, args.batch, args.prompt_len, max_tokens)
    extra = 2 * -(-args.batch * args.prompt_len // (first.dp * first.serving.token_budget())) + 2
    max_tokens += extra
    if args.context:  # (the first prefilled reach the context, not a page-table bucket past it)
        args.prompt_len -= extra
    deployment = narrowed(args.deployment, args.batch, args.prompt_len, max_tokens)
    llm = LLM(args.model or default_model(), deployment=deployment, dtype=getattr(jnp, args.dtype) if args.dtype else None,
              speculative=speculative_flag(args), async_scheduling=args.async_scheduling)
    engine = llm.engine
    warmup_s = time.perf_counter()
    warmup_compilations = 0 if args.lazy else engine.warmup()
    warmup_s = time.perf_counter() - warmup_s
    rng = np.random.default_rng(0)
    vocab = engine.net.config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def prompt(i):
        if args.prompts == "tasks":  # the demo's question (cut to --prompt-len)
            return llm._ids(questions(i + 1, 0)[i])[:args.prompt_len]
        return rng.integers(2, vocab, args.prompt_len).tolist()
    # Two identical rounds: the first runs the workload once through (prefix cache, EP capacity level),
    # the second is measured.
    for i in range(args.batch):
        engine.add_request(prompt(i), params)
    while any(r.in_prefill for rank in engine.scheduler.running for r in rank) or engine.scheduler.waiting:
        engine.step()
    for _ in range(args.steps + 5):  # warm-up: every context bucket the measured steps will reach
        engine.step()
    for req in list(engine.requests.values()):
        engine.abort(req.id)
    for i in range(args.batch):
        engine.add_request(prompt(i), params)
    while any(r.in_prefill for rank in engine.scheduler.running for r in rank) or engine.scheduler.waiting:
        engine.step()
    for _ in range(2):  # (async scheduling: the last prefill step lands, the step in flight is a decode)
        engine.step()
    compiled, retries = engine.compilations, engine.counters["ep_overflow_retries"]
    before = dict(engine.counters)
    walls, hosts = [], []
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
        walls.append(engine.last_step["wall_s"])
        hosts.append(engine.last_step["host_s"])
    elapsed = time.perf_counter() - start
    running = sum(len(r) for r in engine.scheduler.running)
    c = {k: engine.counters[k] - before[k] for k in ("generated_tokens", "spec_drafts", "spec_draft_tokens",
                                                     "spec_accepted_tokens")}
    device = replay_ms(engine, repeats=args.steps)
    result = {
        "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
        "deployment": llm.deployment.name, "dtype": str(engine.pool.dtype), "batch": running, "steps": args.steps,
        "async_scheduling": engine.async_scheduling,
        "decode_tokens_per_s": c["generated_tokens"] / elapsed,
        "speculative_tokens": engine.drafts,
        "acceptance_rate": c["spec_accepted_tokens"] / max(c["spec_draft_tokens"], 1),
        "tokens_per_step": (c["spec_drafts"] + c["spec_accepted_tokens"]) / c["spec_drafts"] if c["spec_drafts"] else 1.0,
        "step_ms_median": 1e3 * float(np.median(walls)), "step_ms_max": 1e3 * max(walls),
        "step_ms_mean": 1e3 * elapsed / args.steps,
        "device_step_ms_median": device,
        "host_overhead_ms": 1e3 * float(np.median(hosts)),
        "wall_minus_replay_ms": 1e3 * float(np.median(walls)) - device,
        "exposed_host_share": 1 - device / (1e3 * float(np.median(walls))),
        "context_at_end": max(len(r.prompt) + len(r.output) for rank in engine.scheduler.running for r in rank),
        "prompt_len": args.prompt_len, "model": args.shapes or str(args.model or "embedded"),
        "recompilations_during_measurement": engine.compilations - compiled,
        "ep_overflow_retries_during_measurement": engine.counters["ep_overflow_retries"] - retries,
        "ep_capacity_level_at_end": engine.stats()["ep_capacity_level"],
        "warmup_compilations": warmup_compilations, "warmup_s": warmup_s,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>36}: {v:.3f}" if isinstance(v, float) else f"{k:>36}: {v}")
    return 0


def sweep(args, argv: list[str]) -> int:
    """Each BATCHxCONTEXT of --sweep in a fresh process (this script without --sweep): the list."""
    import subprocess
    rest, skip = [], False
    for a in argv:  # drop --sweep and its value, --batch / --context (each run sets them)
        if skip:
            skip = False
        elif a in ("--sweep", "--batch", "--context"):
            skip = True
        elif a in ("--both-schedulings", "--async-scheduling", "--no-async-scheduling") and args.both_schedulings:
            pass
        elif not a.startswith(("--sweep=", "--batch=", "--context=")):
            rest.append(a)
    results = []
    modes = ["--no-async-scheduling", "--async-scheduling"] if args.both_schedulings else [None]
    specs = [(*(int(v) for v in spec.lower().split("x")), mode) for spec in args.sweep.split(",") for mode in modes]
    started = time.perf_counter()
    for i, (batch, context, mode) in enumerate(specs):
        eta = "" if not i else f", about {(time.perf_counter() - started) / i * (len(specs) - i) / 60:.0f} min left"
        print(f"[bench_engine] {i + 1}/{len(specs)}: batch {batch}, context {context}{' ' + mode if mode else ''}{eta}",
              file=sys.stderr, flush=True)
        run = subprocess.run([sys.executable, __file__, *rest, "--batch", str(batch), "--context", str(context),
                              *([mode] if mode else []), "--json"], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"batch {batch}, context {context} failed:\n{run.stderr[-3000:]}")
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # (kept if a later run is cut short)
    print(json.dumps(results) if args.json else "\n".join(json.dumps(r) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
