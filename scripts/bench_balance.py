"""The prefill and decode load balancers against round-robin placement, on a skewed workload.

Drives the engine's own schedulers (serving/scheduler.py + serving/balance.py) of a disaggregated
deployment — a prefill slice and a decode slice of --ranks dp ranks each — through a stream of
requests, without the model: a prefill chunk advances its request by the tokens it computes, a
decode step by one token, exactly as the engine's step does. Prompts are 16..2,048 tokens, 20% of
them long (1,024..2,048); outputs 16..128 tokens. Prints, per load and policy, the balancedness
(max / mean over ranks over time: sum of maxima / sum of means) of the prefill balancer's core-attention work and input tokens
(sampled at every placement) and of the decode balancer's KV-cache tokens and requests (sampled at
every decode step).

Load is the prompt tokens arriving per step over the prompt tokens the prefill slice computes per
step: a loaded prefill slice (>= 0.9) is where placement decides throughput; at low load a wave of a
few requests cannot be spread evenly over the ranks by any placement.

    python scripts/bench_balance.py [--json] [--requests N] [--ranks R] [--loads 0.5 1.0 ...] [--seed S]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from serving.config import ServingConfig  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402
from serving.scheduler import Request, Scheduler  # noqa: E402


def workload(n: int, seed: int) -> list[tuple[int, int]]:
    """(prompt length, output length) per request: 20% long prompts."""
    rng = np.random.default_rng(seed)
    long = rng.random(n) < 0.2
    prompt = np.where(long, rng.integers(1024, 2049, n), rng.integers(16, 1024, n))
    return list(zip(prompt.tolist(), rng.integers(16, 129, n).tolist()))


def simulate(policy: str, n: int = 2000, ranks: int = 4, seed: int = 0, load: float = 1.0) -> dict:
    """load: prompt tokens arriving per step over what the prefill slice computes per step."""
    cfg = ServingConfig(block_size=16, max_model_len=4096, prefill_tokens=(256,), prefill_rows=(4,),
                        decode_batch=(128,), placement=policy)
    blocks = 64 * 4096 // 16  # enough for every queue: placement, not memory, is under test
    prefill = Scheduler(cfg, ranks, blocks, max_running=blocks)
    decode = Scheduler(cfg, ranks, blocks)
    rng = np.random.default_rng(seed + 1)
    pending = [Request(f"r{i}", rng.integers(2, 100, p).tolist(), SamplingParams(max_tokens=o), 0, o)
               for i, (p, o) in enumerate(workload(n, seed))]
    pending.reverse()
    handoff, due = [], 0.0
    capacity = ranks * cfg.prefill_rows[-1] * cfg.prefill_tokens[-1]  # prompt tokens per prefill step
    while pending or not prefill.idle or not decode.idle or handoff:
        due += load * capacity
        while pending and due >= len(pending[-1].prompt):
            due -= len(pending[-1].prompt)
            prefill.add(pending.pop())
        batch = prefill.schedule()
        for rows in batch.rows if batch else []:
            for req, pos, k in rows:
                req.computed = pos + k
                if not req.in_prefill:
                    req.output.append(0)  # the first token, sampled on the prefill slice
                    prefill.release(req)
                    handoff.append(req)
        while handoff and decode.receive(handoff[0]):
            handoff.pop(0)
        batch = decode.schedule()
        for rows in batch.rows if batch else []:
            for req, pos, _ in rows:
                req.computed = pos + 1
                req.output.append(0)
                if len(req.output) >= req.max_tokens:
                    decode.finish(req, "length")
    balance = {**{k: v for k, v in prefill.balance.items() if k.startswith("prefill")},
               **{k: v for k, v in decode.balance.items() if k.startswith("decode")}}
    return {k: v.summary() for k, v in balance.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.9, 1.0, 1.1],
                    help="prompt tokens arriving per step / prefill tokens computed per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {str(load): {p: simulate(p, args.requests, args.ranks, args.seed, load) for p in ("balanced", "round_robin")}
           for load in args.loads}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{args.requests} requests, {args.ranks} prefill + {args.ranks} decode ranks; balancedness "
          f"(sum over time of max / sum of mean per rank), balanced vs round-robin")
    names = list(next(iter(out.values()))["balanced"])
    print(f"{'load':>5s} " + " ".join(f"{n:>27s}" for n in names))
    for load, res in out.items():
        print(f"{load:>5s} " + " ".join(f"{res['balanced'][n]['overall']:13.3f} vs {res['round_robin'][n]['overall']:6.3f}     "
                                        for n in names))


if __name__ == "__main__":
    main()
