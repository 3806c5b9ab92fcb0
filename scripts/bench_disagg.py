"""Mixed vs disaggregated serving on one workload: throughput, time to first token (TTFT) and time
per output token (TPOT) percentiles.

Both deployments serve the same open-loop workload: requests arrive at --rate per second (all at
once with --rate 0), prompts of 16..--max-prompt tokens of which --shared share a common prefix,
--max-tokens greedy tokens each. A first pass of the workload warms every compilation (buckets and
hand-over copies); the second is measured. On the emulated CPU mesh the two slices share the host's
cores, so this measures the machinery (hand-over, two schedulers, two step loops), not the
production gain of keeping prefill from interrupting decode.

    python scripts/bench_disagg.py [--json] [--requests 64] [--rate 0] [--max-tokens 32]
        [--mixed configs/deploy/cpu8.json] [--disagg configs/deploy/cpu8-disagg.json] [--model DIR]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":  # the emulated 8-device mesh (docs/DESIGN_NOTES.md: PJRT_NPROC with it)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ["PJRT_NPROC"] = "16"

import numpy as np  # noqa: E402


def workload(n: int, max_prompt: int, shared: float, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, vocab, max_prompt // 2).tolist()
    out = []
    for _ in range(n):
        length = int(rng.integers(16, max_prompt + 1))
        if rng.random() < shared:
            head = prefix[:min(len(prefix), length - 4)]
            out.append(head + rng.integers(3, vocab, length - len(head)).tolist())
        else:
            out.append(rng.integers(3, vocab, length).tolist())
    return out


def serve(llm, prompts, params, rate: float) -> dict:
    """Feeds the prompts at their arrival times while stepping the engine; returns the measurements."""
    engine = llm.engine
    arrivals = np.cumsum(np.full(len(prompts), 1 / rate)) if rate > 0 else np.zeros(len(prompts))
    start, reqs, i = time.perf_counter(), [], 0
    while i < len(prompts) or not engine.idle:
        now = time.perf_counter() - start
        while i < len(prompts) and arrivals[i] <= now:
            reqs.append(engine.add_request(prompts[i], params))
            i += 1
        if engine.idle:
            time.sleep(max(0.0, arrivals[i] - now))
            continue
        engine.step()
    wall = time.perf_counter() - start
    ttft = [r.first_token_at - r.arrival for r in reqs]
    tpot = [(r.finished_at - r.first_token_at) / (len(r.output) - 1) for r in reqs if len(r.output) > 1]
    pct = lambda xs: {f"p{q}": round(float(np.percentile(xs, q)) * 1e3, 2) for q in (50, 90, 99)}  # noqa: E731
    outputs = sum(len(r.output) for r in reqs)
    return {"wall_s": round(wall, 3), "requests": len(reqs), "output_tokens": outputs,
            "output_tokens_per_s": round(outputs / wall, 1),
            "input_tokens_per_s": round(sum(len(r.prompt) for r in reqs) / wall, 1),
            "ttft_ms": pct(ttft), "tpot_ms": pct(tpot), "tokens": [r.output for r in reqs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded jaxseek-tiny)")
    ap.add_argument("--mixed", default=str(ROOT / "configs/deploy/cpu8.json"))
    ap.add_argument("--disagg", default=str(ROOT / "configs/deploy/cpu8-disagg.json"))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0.0, help="arrivals per second (0: all at once)")
    ap.add_argument("--max-prompt", type=int, default=200)
    ap.add_argument("--shared", type=float, default=0.5, help="fraction of prompts sharing a prefix")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from serving import LLM, SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    results = {}
    for name, deployment in (("mixed", args.mixed), ("disaggregated", args.disagg)):
        print(f"[bench_disagg] {name}: loading {deployment}", file=sys.stderr)
        llm = LLM(args.model, deployment=deployment)
        vocab = llm.engine.net.config.vocab_size
        warm = workload(args.requests, args.max_prompt, args.shared, vocab, args.seed + 1)
        serve(llm, warm, params, args.rate)  # compiles every bucket and copy the measured pass meets
        print(f"[bench_disagg] {name}: measuring", file=sys.stderr)
        res = serve(llm, workload(args.requests, args.max_prompt, args.shared, vocab, args.seed), params, args.rate)
        stats = llm.stats()
        res["balance"] = {k: round(v.get("overall", 0.0), 3) for k, v in stats["balance"].items()}
        res["devices"] = stats.get("devices")
        if "handover" in stats:
            res["handover"] = stats["handover"]
        results[name] = res
    same = results["mixed"].pop("tokens") == results["disaggregated"].pop("tokens")
    import jax
    out = {"device": f"{jax.devices()[0].platform} x{len(jax.devices())}", "jax": jax.__version__,
           "requests": args.requests, "rate_per_s": args.rate, "max_tokens": args.max_tokens,
           "identical_tokens": same, **results,
           "disaggregated_over_mixed_throughput": round(results["disaggregated"]["output_tokens_per_s"]
                                                       / results["mixed"]["output_tokens_per_s"], 3)}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['device']}, {args.requests} requests, {args.max_tokens} tokens each, identical tokens: {same}")
    for name in ("mixed", "disaggregated"):
        r = results[name]
        print(f"{name:14s} {r['output_tokens_per_s']:8.1f} out tok/s  TTFT p50/p90/p99 "
              f"{r['ttft_ms']['p50']}/{r['ttft_ms']['p90']}/{r['ttft_ms']['p99']} ms  TPOT p50/p90/p99 "
              f"{r['tpot_ms']['p50']}/{r['tpot_ms']['p90']}/{r['tpot_ms']['p99']} ms")


if __name__ == "__main__":
    main()
