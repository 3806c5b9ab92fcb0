"""Benchmark the EPLB placement on Zipf expert loads (58 layers x 256 experts, 200k choices a layer).

For EP32 prefill (hierarchical: 288 replicas, 8 groups, 4 nodes, 32 GPUs) and EP144 decode (global:
288 replicas, 18 nodes, 144 GPUs) prints, per Zipf alpha, the mean over layers of max / mean GPU
load before rebalancing, after it, DeepSeek's published greedy figure, after / greedy, and the
time to rebalance all layers (best of --repeat runs).

"Before" is the placement without load statistics: slot p holds expert p % 256, as
model.moe.default_placement. Prefill gets 256 slots there (no redundancy, 8 experts per GPU);
decode keeps its 288 slots (144 GPUs do not divide 256), so experts 0-31 have two replicas,
a random 32 since every layer's expert order is random.

    python scripts/bench_eplb.py [--json] [--seed N] [--repeat N]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from sharding.eplb import balancedness, rebalance_experts, zipf_loads  # noqa: E402

SETTINGS = {  # name: (policy, num_replicas, num_groups, num_nodes, num_gpus, slots before)
    "prefill": ("hierarchical", 288, 8, 4, 32, 256),
    "decode": ("global", 288, 8, 18, 144, 288),
}
ALPHAS = (0.6, 0.8, 1.0, 1.2)
PUBLISHED_GREEDY = {"prefill": (1.07, 1.17, 1.45, 2.01), "decode": (1.35, 1.63, 2.04, 2.48)}


def default_balancedness(w, num_slots, num_gpus):
    phy2log = np.broadcast_to(np.arange(num_slots) % w.shape[1], (len(w), num_slots))
    logcnt = np.broadcast_to(np.bincount(phy2log[0], minlength=w.shape[1]), w.shape)
    return float(balancedness(w, phy2log, logcnt, num_gpus).mean())


def bench(seed: int, repeat: int) -> dict:
    results = {}
    for name, (policy, replicas, groups, nodes, gpus, before_slots) in SETTINGS.items():
        rows = []
        for alpha, greedy in zip(ALPHAS, PUBLISHED_GREEDY[name]):
            w = zipf_loads(alpha, seed=seed)
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                phy2log, _, logcnt = rebalance_experts(w, replicas, groups, nodes, gpus, policy=policy)
                times.append(time.perf_counter() - start)
            after = float(balancedness(w, phy2log, logcnt, gpus).mean())
            rows.append({"alpha": alpha, "before": default_balancedness(w, before_slots, gpus), "after": after,
                         "published_greedy": greedy, "after_over_greedy": after / greedy,
                         "ms": min(times) * 1e3})
        results[name] = {"policy": policy, "num_replicas": replicas, "num_groups": groups, "num_nodes": nodes,
                         "num_gpus": gpus, "rows": rows}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic loads (default 0)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per setting, best kept (default 3)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    results = bench(args.seed, args.repeat)
    if args.json:
        print(json.dumps({"seed": args.seed, "layers": 58, "experts": 256, "tokens_per_layer": 200_000,
                          "metric": "mean over layers of max / mean GPU load", "settings": results}))
        return
    for name, setting in results.items():
        print(f"{name}: {setting['policy']}, {setting['num_replicas']} replicas, {setting['num_groups']} groups, "
              f"{setting['num_nodes']} nodes, {setting['num_gpus']} GPUs")
        print(f"  {'alpha':>5} {'before':>7} {'after':>7} {'greedy':>7} {'after/greedy':>12} {'ms':>7}")
        for r in setting["rows"]:
            print(f"  {r['alpha']:5.1f} {r['before']:7.3f} {r['after']:7.3f} {r['published_greedy']:7.2f} "
                  f"{r['after_over_greedy']:12.3f} {r['ms']:7.1f}")


if __name__ == "__main__":
    main()
