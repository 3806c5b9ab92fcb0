"""Plans a day of serving: prefill and decode nodes for each hour of a 24-hour load curve (schema:
docs/ECONOMICS.md), nodes freed for training, node-hours and cost, and optionally a PNG of the day.
Per-node throughput, GPUs per node, prices and the published peak/average to compare with come from
--stats (a statistics JSON); flags override the throughput and the GPU-hour price. Prefill capacity
is counted against all input tokens, cache hits included, as DeepSeek's 73.7k tokens/s per node is.

examples:
  python scripts/plan_capacity.py configs/economics/diurnal-load.json --png day.png
  python scripts/plan_capacity.py configs/economics/diurnal-load.json --write-cosine   # regenerate it"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from serving import capacity, economics
from serving.economics import EconomicsError

ROOT = Path(__file__).resolve().parents[1]
DEEPSEEK_DAY = ROOT / "configs" / "economics" / "deepseek-2025-02-27.json"
DAY_START, TIMEZONE = 12, "UTC+8"  # DeepSeek's statistics day runs 12:00 to 12:00 Beijing time


def _throughput(flag: str, value: float | None, field: str, record: economics.Record, path: Path) -> float:
    value = value if value is not None else getattr(record.stats, field)
    if value is None:
        raise EconomicsError(f"{path} has no '{field}': give {flag}")
    return economics.check(flag, value, positive=True)


def _write_cosine(path: Path, record: economics.Record, args) -> None:
    stats = record.stats
    if args.peak_to_mean is None and (stats.peak_nodes is None or stats.average_nodes is None):
        raise EconomicsError(f"{args.stats} has no 'peak_nodes' and 'average_nodes': give --peak-to-mean")
    ratio = stats.peak_nodes / stats.average_nodes if args.peak_to_mean is None else args.peak_to_mean
    peak = f"{int(args.peak_hour):02d}:{round(60 * (args.peak_hour % 1)):02d}"
    source = (f"scripts/plan_capacity.py --write-cosine: cosine day with the 24 h totals of {args.stats.name}, "
              f"peak/mean {ratio:.4f}, peak at {peak} {TIMEZONE}")
    curve = capacity.cosine_curve(stats, peak_to_mean=ratio, peak_hour=args.peak_hour, start_hour=DAY_START,
                                  timezone=TIMEZONE, source=source)
    path.write_text(json.dumps(curve.to_json(), indent=1) + "\n")


def _result(args, curve, plan, prefill, decode, record, prices) -> dict:
    stats = capacity.plan_stats(curve, plan, record.stats.gpus_per_node, prefill, decode)
    ref = record.stats
    return {
        "curve": str(args.curve), "stats": os.path.relpath(args.stats), "cluster_nodes": plan.cluster_nodes,
        "headroom": args.headroom, "min_nodes": args.min_nodes,
        "prefill_tokens_per_s_per_node": prefill, "decode_tokens_per_s_per_node": decode,
        "hours": [{"clock_hour": h, "input_tokens": i, "output_tokens": o, "prefill_nodes": p, "decode_nodes": d,
                   "freed_nodes": f}
                  for h, i, o, p, d, f in zip(plan.clock_hours, curve.input_tokens, curve.output_tokens,
                                              plan.prefill_nodes, plan.decode_nodes, plan.freed_nodes)],
        "node_hours": plan.node_hours, "prefill_node_hours": sum(plan.prefill_nodes),
        "decode_node_hours": sum(plan.decode_nodes), "freed_node_hours": sum(plan.freed_nodes),
        "peak_nodes": plan.peak_nodes, "average_nodes": plan.average_nodes,
        "average_need": dict(zip(("prefill", "decode"), capacity.average_need(curve, prefill, decode))),
        "published": {"peak_nodes": ref.peak_nodes, "average_nodes": ref.average_nodes},
        "economics": economics.report(stats, prices),
        "png": str(args.png) if args.png else None,
    }


def _render(r: dict, curve: capacity.LoadCurve) -> str:
    e = r["economics"]
    need = r["average_need"]
    lines = [f"load {r['curve']}: 24 h from {curve.start_hour:02d}:00 {curve.timezone}; "
             f"{e['input_tokens'] / 1e9:,.1f}B input tokens ({100 * e['cache_hit_fraction']:.2f}% cache hits), "
             f"{e['output_tokens'] / 1e9:,.1f}B output tokens",
             f"per node: prefill {r['prefill_tokens_per_s_per_node']:,.0f} input tok/s (all input tokens, cache hits "
             f"included), decode {r['decode_tokens_per_s_per_node']:,.0f} output tok/s; headroom x{r['headroom']:.2f}, "
             f"at least {r['min_nodes']} node(s) per role, cluster {r['cluster_nodes']} nodes",
             "", "hour   input M tok/s  output M tok/s  prefill  decode  total  freed"]
    lines += [f"{h['clock_hour']:02d}:00  {h['input_tokens'] / 3.6e9:13.2f}  {h['output_tokens'] / 3.6e9:14.3f}"
              f"  {h['prefill_nodes']:7d}  {h['decode_nodes']:6d}  {h['prefill_nodes'] + h['decode_nodes']:5d}"
              f"  {h['freed_nodes']:5d}" for h in r["hours"]]
    lines += ["",
              f"node-hours  {r['node_hours']:,} = prefill {r['prefill_node_hours']:,}"
              f" + decode {r['decode_node_hours']:,};"
              f" freed for training {r['freed_node_hours']:,} of the cluster's {24 * r['cluster_nodes']:,}",
              f"nodes       peak {r['peak_nodes']}, average {r['average_nodes']:.2f} (the load alone keeps "
              f"{need['prefill']:.2f} + {need['decode']:.2f} = {sum(need.values()):.2f} nodes busy on average)"]
    pub = r["published"]
    if pub["peak_nodes"] is not None and pub["average_nodes"] is not None:
        lines.append(f"published   peak {pub['peak_nodes']:g}, average {pub['average_nodes']:g} ({r['stats']})")
    lines.append(f"cost        {r['node_hours']:,} node-h x {e['gpus_per_node']} GPUs = {e['gpu_hours']:,.0f} GPU-h"
                 f" x ${e['prices']['per_gpu_hour']:.2f} = ${e['cost_usd']:,.0f}; at list prices revenue "
                 f"${e['revenue_usd']:,.0f}, margin {e['margin_percent']:.1f}%")
    if r["png"]:
        lines.append(f"wrote {r['png']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("curve", type=Path, help="24-hour load curve JSON, e.g. configs/economics/diurnal-load.json")
    ap.add_argument("--stats", type=Path, default=DEEPSEEK_DAY, help="statistics JSON giving per-node throughput, "
                    "GPUs per node, prices and the published peak/average (default: %(default)s)")
    ap.add_argument("--prefill-tok-s-per-node", type=float, help="input tokens/s per node, cache hits included")
    ap.add_argument("--decode-tok-s-per-node", type=float, help="output tokens/s per node at the per-user SLO")
    ap.add_argument("--cluster-nodes", type=int, default=300,
                    help="nodes shared with training (default %(default)s: the published peak 278 plus a margin)")
    ap.add_argument("--headroom", type=float, default=1.0, help="plan for this multiple of the load (default 1)")
    ap.add_argument("--min-nodes", type=int, default=1, help="fewest nodes per role in any hour (default 1)")
    ap.add_argument("--gpu-hour", type=float, help="USD per GPU-hour (default: the --stats file's price)")
    ap.add_argument("--png", type=Path, help="draw the day into this PNG")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    ap.add_argument("--write-cosine", action="store_true", help="first (re)write CURVE as a cosine day with the "
                    "--stats file's 24 h totals, starting at 12:00 UTC+8")
    ap.add_argument("--peak-hour", type=float, default=15.5, help="with --write-cosine: clock time of the peak "
                    "(default %(default)s, the middle of the 15:00 hour)")
    ap.add_argument("--peak-to-mean", type=float, help="with --write-cosine: peak over mean load "
                    "(default: the --stats file's peak_nodes / average_nodes)")
    args = ap.parse_args(argv)
    try:
        record = economics.load(args.stats)
        if record.prices is None:
            raise EconomicsError(f"{args.stats}: no 'prices' object to cost the plan with")
        prices = record.prices
        if args.gpu_hour is not None:
            prices = dataclasses.replace(prices, per_gpu_hour=economics.check("--gpu-hour", args.gpu_hour))
        prefill = _throughput("--prefill-tok-s-per-node", args.prefill_tok_s_per_node,
                              "prefill_tokens_per_s_per_node", record, args.stats)
        decode = _throughput("--decode-tok-s-per-node", args.decode_tok_s_per_node,
                             "decode_tokens_per_s_per_node", record, args.stats)
        if args.write_cosine:
            _write_cosine(args.curve, record, args)
        curve = capacity.load_curve(args.curve)
        plan = capacity.plan_day(curve, prefill, decode, args.cluster_nodes, headroom=args.headroom,
                                 min_nodes=args.min_nodes)
        result = _result(args, curve, plan, prefill, decode, record, prices)
    except EconomicsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.png:
        capacity.draw(curve, plan, args.png, title=f"{args.curve.name}: peak {plan.peak_nodes} nodes, "
                      f"average {plan.average_nodes:.2f}, cluster {plan.cluster_nodes}")
    print(json.dumps(result, indent=2) if args.json else _render(result, curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
