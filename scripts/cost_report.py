"""Cost, theoretical revenue and cost-profit margin of a window of serving, with the arithmetic shown
line by line, from a statistics JSON (schema: docs/ECONOMICS.md). Prices default to the file's
'prices' object; the flags override them one by one. Per-GPU throughput (from --throughput-json, the
flags, or the file's per-node figures) is turned into dollars per million tokens.

example: python scripts/cost_report.py configs/economics/deepseek-2025-02-27.json"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from serving import economics
from serving.economics import EconomicsError


def _prices(record: economics.Record, args, path: Path) -> economics.Prices:
    flags = {"per_gpu_hour": ("--gpu-hour", args.gpu_hour),
             "per_million_input_cache_hit": ("--price-hit", args.price_hit),
             "per_million_input_cache_miss": ("--price-miss", args.price_miss),
             "per_million_output": ("--price-output", args.price_output)}
    given = {key: economics.check(flag, value) for key, (flag, value) in flags.items() if value is not None}
    if record.prices is None and len(given) < len(flags):
        raise EconomicsError(f"{path}: no 'prices' object, so give all of --gpu-hour, --price-hit, --price-miss "
                             "and --price-output")
    return dataclasses.replace(record.prices, **given) if record.prices else economics.Prices(**given)


def _throughput(record: economics.Record, args) -> economics.Throughput:
    base = economics.load_throughput(args.throughput_json) if args.throughput_json else record.stats.per_gpu()
    flags = {"prefill_tokens_per_s_per_gpu": ("--prefill-tok-s-per-gpu", args.prefill_tok_s_per_gpu),
             "decode_tokens_per_s_per_gpu": ("--decode-tok-s-per-gpu", args.decode_tok_s_per_gpu)}
    return dataclasses.replace(base, **{key: economics.check(flag, value, positive=True)
                                        for key, (flag, value) in flags.items() if value is not None})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stats", type=Path, help="statistics JSON, e.g. configs/economics/deepseek-2025-02-27.json")
    ap.add_argument("--gpu-hour", type=float, help="USD per GPU-hour")
    ap.add_argument("--price-hit", type=float, help="USD per million input tokens that hit the KV cache")
    ap.add_argument("--price-miss", type=float, help="USD per million input tokens that miss the KV cache")
    ap.add_argument("--price-output", type=float, help="USD per million output tokens")
    ap.add_argument("--throughput-json", type=Path, help="JSON with prefill_tokens_per_s_per_gpu and/or "
                    "decode_tokens_per_s_per_gpu (a benchmark's result)")
    ap.add_argument("--prefill-tok-s-per-gpu", type=float, help="input tokens/s per GPU, cache hits included")
    ap.add_argument("--decode-tok-s-per-gpu", type=float, help="output tokens/s per GPU at the per-user SLO")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = ap.parse_args(argv)
    try:
        record = economics.load(args.stats)
        prices = _prices(record, args, args.stats)
        rep = economics.report(record.stats, prices, throughput=_throughput(record, args),
                               # the published figures hold only at the file's own prices
                               published=record.published if prices == record.prices else None,
                               source=record.source, note=record.note)
    except EconomicsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2) if args.json else economics.render(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
