"""Wall-clock speed-up of MTP speculative decoding in `LLM.generate`: the same greedy requests (the
tiny model's demo questions, what its MTP module was trained to continue) through two engines of
one deployment, without and with drafts. Each engine is warmed up on other questions first, so
nothing compiles while timed; the timed runs alternate between the engines (fair on a shared
machine) and the median is reported, with the outputs checked identical.

    python scripts/bench_speculative.py --requests 64 --json [--deployment configs/deploy/cpu8.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployment", default=str(ROOT / "configs/deploy/cpu8.json"))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--speculative-tokens", type=int, default=1, help="MTP drafts per request and step (k)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine")
    ap.add_argument("--cpu-devices", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if min(args.requests, args.max_tokens, args.speculative_tokens, args.repeats) < 1:
        ap.error("--requests, --max-tokens, --speculative-tokens and --repeats must be >= 1")
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ.setdefault("PJRT_NPROC", str(2 * args.cpu_devices))  # the emulated mesh needs it

    from serving import LLM, SamplingParams
    from serving.api import DEFAULT_MODEL, Tokenizer
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_engine import narrowed
    from demo import expected, questions

    timed, warm = questions(args.requests, 1), questions(args.requests, 2)
    longest = max(len(Tokenizer(DEFAULT_MODEL).encode(q)) + 1 for q in timed + warm)  # + BOS
    # the answer plus room for a verify window's drafts past it
    deployment = narrowed(args.deployment, args.requests, longest, args.max_tokens + args.speculative_tokens)
    params = SamplingParams(max_tokens=args.max_tokens)
    engines = {"plain": LLM(deployment=deployment, speculative=None),
               "mtp": LLM(deployment=deployment, speculative={"method": "mtp", "num_tokens": args.speculative_tokens})}
    for llm in engines.values():
        llm.engine.warmup()
        llm.generate(warm, params)
    seconds, outputs, steps = {name: [] for name in engines}, {}, {}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            before = llm.stats()
            start = time.perf_counter()
            outputs[name] = llm.generate(timed, params)
            seconds[name].append(time.perf_counter() - start)
            after = llm.stats()
            steps[name] = after["decode_steps"] - before["decode_steps"]
    compiled = {name: llm.stats()["compilations"] for name, llm in engines.items()}
    same = [o.token_ids for o in outputs["mtp"]] == [o.token_ids for o in outputs["plain"]]
    tokens = sum(len(o.token_ids) for o in outputs["mtp"])
    spec = engines["mtp"].stats()["speculative"]
    median = {name: statistics.median(s) for name, s in seconds.items()}
    report = {
        "deployment": args.deployment, "requests": args.requests, "max_tokens": args.max_tokens,
        "speculative_tokens": args.speculative_tokens, "generated_tokens": tokens,
        "correct_answers": sum(o.text == expected(q) for q, o in zip(timed, outputs["mtp"])),
        "identical_outputs": same, "seconds": seconds, "median_s": median,
        "tok_per_s": {name: round(tokens / s, 1) for name, s in median.items()},
        "speedup": round(median["plain"] / median["mtp"], 3),
        "decode_steps_per_run": steps, "acceptance_rate": round(spec["acceptance_rate"], 4),
        "tokens_per_step": round(spec["tokens_per_step"], 3), "compilations": compiled,
        "load_average": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"LLM.generate, {args.requests} requests x {args.max_tokens} tokens: plain {median['plain']:.2f} s, "
              f"MTP k={args.speculative_tokens} {median['mtp']:.2f} s -> {report['speedup']}x "
              f"(acceptance {spec['acceptance_rate']:.1%}, {spec['tokens_per_step']:.2f} tokens/step, "
              f"decode steps {steps['plain']} -> {steps['mtp']}; identical outputs: {same})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
