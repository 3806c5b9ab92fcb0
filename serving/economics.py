"""Serving economics: what a window of inference costs, what it would earn at list prices, and the
cost-profit margin between them, from one statistics record (the JSON our engine writes from
llm.stats(), or DeepSeek's published day in configs/economics/). Pure Python; the schema and the
published figures are in docs/ECONOMICS.md."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

MILLION = 1e6
TOLERANCE = 1e-3  # published dollar figures must match ours within 0.1%: DeepSeek rounds tokens to 1B
KINDS = {"input_cache_hit": ("input_tokens_cache_hit", "per_million_input_cache_hit"),  # kind: (Stats, Prices field)
         "input_cache_miss": ("input_tokens_cache_miss", "per_million_input_cache_miss"),
         "output": ("output_tokens", "per_million_output")}


class EconomicsError(ValueError):
    """A statistics, price, throughput or load record (file or argument) we cannot use."""


def check(name: str, value, *, positive: bool = False, integer: bool = False):
    """Returns value if it is a finite number (an int if integer) that is >= 0 (> 0 if positive)."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise EconomicsError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise EconomicsError(f"'{name}' must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _check_fields(record, positive: frozenset = frozenset(), integer: frozenset = frozenset()):
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if not (value is None and f.default is None):  # optional fields may be left out
            check(f.name, value, positive=f.name in positive, integer=f.name in integer)


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Measured tokens per second per GPU of each phase (a benchmark's result, or a Stats' per-node
    figures divided by its GPUs per node)."""
    prefill_tokens_per_s_per_gpu: float | None = None  # all input tokens, cache hits included
    decode_tokens_per_s_per_gpu: float | None = None   # measured at the per-user speed SLO

    def __post_init__(self):
        _check_fields(self, positive=frozenset(f.name for f in dataclasses.fields(self)))


@dataclasses.dataclass(frozen=True)
class Stats:
    """A window of serving, as counted by the engine or published by DeepSeek. Machine time is given
    either as average_nodes (DeepSeek publishes node counts) or gpu_seconds (what the engine counts)."""
    window_hours: float
    gpus_per_node: int
    input_tokens_cache_hit: float   # prompt tokens whose KV came from the on-disk cache
    input_tokens_cache_miss: float  # prompt tokens prefilled from scratch
    output_tokens: float
    average_nodes: float | None = None
    gpu_seconds: float | None = None
    peak_nodes: float | None = None
    prefill_tokens_per_s_per_node: float | None = None  # all input tokens, cache hits included
    decode_tokens_per_s_per_node: float | None = None

    def __post_init__(self):
        _check_fields(self, integer=frozenset({"gpus_per_node"}), positive=frozenset({
            "window_hours", "gpus_per_node", "prefill_tokens_per_s_per_node", "decode_tokens_per_s_per_node"}))
        if (self.average_nodes is None) == (self.gpu_seconds is None):
            raise EconomicsError("give exactly one of 'average_nodes' and 'gpu_seconds'")

    @property
    def input_tokens(self) -> float:
        return self.input_tokens_cache_hit + self.input_tokens_cache_miss

    @property
    def gpu_hours(self) -> float:
        if self.gpu_seconds is not None:
            return self.gpu_seconds / 3600
        return self.average_nodes * self.gpus_per_node * self.window_hours

    def per_gpu(self) -> Throughput:
        per_node = (self.prefill_tokens_per_s_per_node, self.decode_tokens_per_s_per_node)
        return Throughput(*(None if t is None else t / self.gpus_per_node for t in per_node))


@dataclasses.dataclass(frozen=True)
class Prices:
    """List prices in USD: per million tokens of each kind, and the rent of one GPU for an hour."""
    per_million_input_cache_hit: float
    per_million_input_cache_miss: float
    per_million_output: float
    per_gpu_hour: float

    def __post_init__(self):
        _check_fields(self)


@dataclasses.dataclass(frozen=True)
class Published:
    """Headline figures as their publisher rounded them, to check our arithmetic against."""
    cost_usd: float
    revenue_usd: float
    margin_percent: int  # a whole percent: DeepSeek's "545%" is 545.5% cut to the percent

    def __post_init__(self):
        _check_fields(self, positive=frozenset({"cost_usd", "revenue_usd"}), integer=frozenset({"margin_percent"}))


@dataclasses.dataclass(frozen=True)
class Record:
    """One statistics file: the stats at top level, optionally 'prices', 'published', 'source', 'note'."""
    stats: Stats
    prices: Prices | None = None
    published: Published | None = None
    source: str = ""
    note: str = ""


def read_json_object(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise EconomicsError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise EconomicsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise EconomicsError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def from_dict(cls, raw, where: str = ""):
    """Builds dataclass cls from a JSON object; unknown keys are errors (they are usually typos)."""
    try:
        if not isinstance(raw, dict):
            raise EconomicsError(f"expected a JSON object, got {raw!r}")
        fields = dataclasses.fields(cls)
        unknown = sorted(set(raw) - {f.name for f in fields})
        if unknown:
            raise EconomicsError(f"unknown field '{unknown[0]}' (known: {', '.join(f.name for f in fields)})")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in raw]
        if missing:
            raise EconomicsError(f"required field '{missing[0]}' is missing")
        return cls(**raw)
    except EconomicsError as e:
        raise EconomicsError(f"{where}: {e}" if where else str(e)) from None


def load(path: str | Path) -> Record:
    raw = read_json_object(path)
    parts = {key: raw.pop(key) for key in ("prices", "published", "source", "note") if key in raw}
    try:
        for key in ("source", "note"):
            if not isinstance(parts.get(key, ""), str):
                raise EconomicsError(f"'{key}' must be a string, got {parts[key]!r}")
        optional = {key: from_dict(cls, parts[key], key) if key in parts else None
                    for key, cls in (("prices", Prices), ("published", Published))}
        return Record(stats=from_dict(Stats, raw), **optional,
                      source=parts.get("source", ""), note=parts.get("note", ""))
    except EconomicsError as e:
        raise EconomicsError(f"{path}: {e}") from None


def load_throughput(path: str | Path) -> Throughput:
    return from_dict(Throughput, read_json_object(path), str(path))


def cost(stats: Stats, price_per_gpu_hour: float) -> float:
    return stats.gpu_hours * check("price_per_gpu_hour", price_per_gpu_hour)


def revenue_by_kind(stats: Stats, prices: Prices) -> dict[str, float]:
    return {kind: getattr(stats, tokens) / MILLION * getattr(prices, price) for kind, (tokens, price) in KINDS.items()}


def revenue(stats: Stats, prices: Prices) -> float:
    """Theoretical revenue: every token billed at list price (no free tiers, no discounts)."""
    return sum(revenue_by_kind(stats, prices).values())


def margin(cost: float, revenue: float) -> float:
    """Cost-profit margin as DeepSeek defines it: profit over cost (5.45 reads as 545%)."""
    return (check("revenue", revenue) - check("cost", cost, positive=True)) / cost


def dollars_per_million_tokens(tokens_per_s_per_gpu: float, price_per_gpu_hour: float) -> float:
    """What a million tokens cost on a GPU rented at price_per_gpu_hour that sustains this throughput."""
    tokens_per_gpu_hour = check("tokens_per_s_per_gpu", tokens_per_s_per_gpu, positive=True) * 3600
    return check("price_per_gpu_hour", price_per_gpu_hour) / (tokens_per_gpu_hour / MILLION)


def _phase(tokens: float, per_gpu: float, stats: Stats, prices: Prices) -> dict:
    return {"tokens": tokens, "tokens_per_s_per_gpu": per_gpu,
            "million_tokens_per_gpu_hour": per_gpu * 3600 / MILLION,
            "usd_per_million_tokens": dollars_per_million_tokens(per_gpu, prices.per_gpu_hour),
            # the nodes this phase keeps busy on average: ties the throughput back to the node count
            "average_nodes_needed": tokens / (stats.window_hours * 3600) / (per_gpu * stats.gpus_per_node)}


def _compare(ours: dict, published: Published) -> dict:
    out = {key: {"published": getattr(published, key), "ours": ours[key],
                 "relative_difference": ours[key] / getattr(published, key) - 1}
           for key in ("cost_usd", "revenue_usd")}
    out["margin_percent"] = {"published": published.margin_percent, "ours": ours["margin_percent"],
                             "ours_whole_percent": math.floor(ours["margin_percent"]),
                             "from_published_dollars": 100 * margin(published.cost_usd, published.revenue_usd)}
    out["matches"] = (all(abs(out[k]["relative_difference"]) <= TOLERANCE for k in ("cost_usd", "revenue_usd"))
                      and out["margin_percent"]["ours_whole_percent"] == published.margin_percent)
    return out


def report(stats: Stats, prices: Prices, *, throughput: Throughput | None = None,
           published: Published | None = None, source: str = "", note: str = "") -> dict:
    """Every number of the cost / revenue / margin arithmetic, plus $ per million tokens of each phase
    where a throughput is known (default: the stats' per-node figures) and the published check."""
    throughput = throughput or stats.per_gpu()
    by_kind = revenue_by_kind(stats, prices)
    out = {"source": source, "note": note, **dataclasses.asdict(stats),
           "input_tokens": stats.input_tokens,
           "cache_hit_fraction": stats.input_tokens_cache_hit / (stats.input_tokens or 1),  # 0 for no input
           "gpu_hours": stats.gpu_hours, "prices": dataclasses.asdict(prices),
           "cost_usd": cost(stats, prices.per_gpu_hour), "revenue_usd_by_kind": by_kind,
           "revenue_usd": sum(by_kind.values())}
    out["margin"] = margin(out["cost_usd"], out["revenue_usd"])
    out["margin_percent"] = 100 * out["margin"]
    phases = {"prefill": (stats.input_tokens, throughput.prefill_tokens_per_s_per_gpu),
              "decode": (stats.output_tokens, throughput.decode_tokens_per_s_per_gpu)}
    out["phases"] = {name: _phase(tokens, per_gpu, stats, prices)
                     for name, (tokens, per_gpu) in phases.items() if per_gpu is not None}
    out["published"] = _compare(out, published) if published else None
    return out


def _tokens(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:,.1f}{suffix}"
    return f"{n:,.0f}"


def _usd(x: float) -> str:
    return f"${x:,.0f}" if abs(x) >= 1000 else f"${x:,.2f}"


def render(rep: dict) -> str:
    """The report as text, one line per step of the arithmetic."""
    lines = [f"source: {rep['source']}"] if rep["source"] else []
    lines += [f"window {rep['window_hours']:g} h, {rep['gpus_per_node']} GPUs per node"
              + (f", peak {rep['peak_nodes']:g} nodes" if rep["peak_nodes"] is not None else "")]
    lines += _render_money(rep) + _render_phases(rep)
    if rep["published"]:
        lines += _render_published(rep["published"])
    return "\n".join(lines + ([f"note: {rep['note']}"] if rep["note"] else []))


def _render_money(rep: dict) -> list[str]:
    p, by_kind, cost_usd = rep["prices"], rep["revenue_usd_by_kind"], _usd(rep["cost_usd"])
    if rep["average_nodes"] is not None:
        machine = f"{rep['average_nodes']:,.2f} nodes x {rep['gpus_per_node']} GPUs x {rep['window_hours']:g} h"
    else:
        machine = f"{rep['gpu_seconds']:,.0f} GPU-s / 3600"
    return ["cost",
            f"  GPU-hours = {machine} = {rep['gpu_hours']:,.0f} GPU-h",
            f"  cost      = {rep['gpu_hours']:,.0f} GPU-h x {_usd(p['per_gpu_hour'])}/GPU-h = {cost_usd}",
            "revenue (theoretical: every token billed at list price)",
            *(f"  {kind.replace('_', ' '):16s} {_tokens(rep[tokens])} tokens x {_usd(p[price])}/M"
              f" = {_usd(by_kind[kind])}" for kind, (tokens, price) in KINDS.items()),
            f"  revenue = {' + '.join(_usd(v) for v in by_kind.values())} = {_usd(rep['revenue_usd'])}"
            f"  ({100 * rep['cache_hit_fraction']:.2f}% of input tokens hit the cache)",
            "margin (cost-profit: profit over cost)",
            f"  ({_usd(rep['revenue_usd'])} - {cost_usd}) / {cost_usd} = {rep['margin']:.4f}"
            f" = {rep['margin_percent']:.1f}%"]


def _render_phases(rep: dict) -> list[str]:
    gpu_hour = _usd(rep["prices"]["per_gpu_hour"])
    lines = [f"per phase at {gpu_hour}/GPU-h"] if rep["phases"] else []
    for name, ph in rep["phases"].items():
        per_hour = ph["million_tokens_per_gpu_hour"]
        lines.append(f"  {name:7s} {ph['tokens_per_s_per_gpu']:,.1f} tok/s/GPU x 3600 = {per_hour:.2f}M tok/GPU-h"
                     f" -> {gpu_hour} / {per_hour:.2f} = ${ph['usd_per_million_tokens']:.4f} per M"
                     f" {'input' if name == 'prefill' else 'output'} tokens; {_tokens(ph['tokens'])} tokens keep"
                     f" {ph['average_nodes_needed']:.2f} nodes busy on average")
    if len(rep["phases"]) == 2 and rep["average_nodes"] is not None:
        need = sum(ph["average_nodes_needed"] for ph in rep["phases"].values())
        lines.append(f"  prefill + decode = {need:.2f} nodes vs {rep['average_nodes']:,.2f} average nodes")
    return lines


def _render_published(pub: dict) -> list[str]:
    m = pub["margin_percent"]
    lines = ["published vs ours"]
    lines += [f"  {key[:-4]:7s} {_usd(c['published'])} published, {_usd(c['ours'])} ours:"
              f" {100 * c['relative_difference']:+.3f}% (tolerance {100 * TOLERANCE:g}%)"
              for key, c in pub.items() if key in ("cost_usd", "revenue_usd")]
    lines += [f"  margin  {m['published']}% published, {m['ours']:.2f}% ours ({m['from_published_dollars']:.2f}%"
              f" from the published dollars), cut to a whole percent: {m['ours_whole_percent']}%",
              f"  matches to rounding: {'yes' if pub['matches'] else 'NO'}"]
    return lines
