"""The prefill and decode load balancers against round-robin placement, on a skewed workload.

Drives the engine's own schedulers (serving/scheduler.py + serving/balance.py) of a disaggregated
deployment — a prefill slice and a decode slice of --ranks dp ranks each — through a stream of
requests, without the model: each step's batch advances its requests through the engine's own
Scheduler.update_from_output, with token 0 standing in for every sampled token. Prompts are 16..2,048 tokens, 20% of
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

from serving.request import Request  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402
from serving.scheduler import Scheduler  # noqa: E402
from sharding.deployment import ServingConfig  # noqa: E402


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
    prefill = Scheduler(cfg, ranks, blocks, max_running=blocks, role="prefill")
    decode = Scheduler(cfg, ranks, blocks, role="decode")
    rng = np.random.default_rng(seed + 1)
    params = [SamplingParams(max_tokens=o, ignore_eos=True) for _, o in workload(n, seed)]
    pending = [Request(f"r{i}", rng.integers(2, 100, p).tolist(), params[i], 0, o)
               for i, (p, o) in enumerate(workload(n, seed))]
    pending.reverse()
    due = 0.0
    capacity = ranks * cfg.prefill_rows[-1] * cfg.prefill_tokens[-1]  # prompt tokens per prefill step
    while pending or not prefill.idle or not decode.idle:
        due += load * capacity
        while pending and due >= len(pending[-1].prompt):
            due -= len(pending[-1].prompt)
            prefill.add(pending.pop())
        for scheduler in (prefill, decode):
            for batch in scheduler.schedule():  # (the first token of a prompt is sampled on the prefill slice)
                scheduler.dispatched(batch)
                scheduler.update_from_output(batch, np.zeros(ranks * max(map(len, batch.rows)), np.int32))
            while scheduler is prefill and prefill.outbox:  # FIFO hand-over, as serving/disagg.py does
                req = prefill.outbox[0]
                source = req.rank, req.blocks
                if not decode.receive(req):  # (on success req.rank, req.blocks are the decode side's)
                    break
                prefill.handed_over(req, *source)
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
