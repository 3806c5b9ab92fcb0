"""Capacity planning for a day of serving: how many prefill and decode nodes to run each hour for a
24-hour load curve, and how many nodes of the cluster that leaves for training. Prefill capacity is
counted against ALL input tokens, cache hits included, because that is how DeepSeek defines its
73.7k input tokens/s per node; decode capacity is output tokens/s per node at the per-user speed SLO
(>= 20 tokens/s per user). See docs/ECONOMICS.md."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from serving.economics import EconomicsError, Stats, check, from_dict, read_json_object

HOURS = 24
LOADS = ("input_tokens_cache_hit", "input_tokens_cache_miss", "output_tokens")


@dataclasses.dataclass(frozen=True)
class LoadCurve:
    """Tokens served in each of 24 consecutive hours, split like a Stats record; hour i starts at
    clock hour (start_hour + i) % 24 in the given timezone."""
    input_tokens_cache_hit: tuple[float, ...]
    input_tokens_cache_miss: tuple[float, ...]
    output_tokens: tuple[float, ...]
    start_hour: int = 0
    timezone: str = ""
    source: str = ""

    def __post_init__(self):
        for name in LOADS:
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or len(values) != HOURS:
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)
                raise EconomicsError(f"'{name}' must be a list of {HOURS} hourly token counts, got {got}")
            for hour, value in enumerate(values):
                check(f"{name}[{hour}]", value)
            object.__setattr__(self, name, tuple(values))  # JSON gives lists; keep the record immutable
        if check("start_hour", self.start_hour, integer=True) >= HOURS:
            raise EconomicsError(f"'start_hour' must be a clock hour 0..23, got {self.start_hour}")
        for name in ("timezone", "source"):
            if not isinstance(getattr(self, name), str):
                raise EconomicsError(f"'{name}' must be a string, got {getattr(self, name)!r}")

    @property
    def input_tokens(self) -> tuple[float, ...]:
        return tuple(h + m for h, m in zip(self.input_tokens_cache_hit, self.input_tokens_cache_miss))

    @property
    def clock_hours(self) -> tuple[int, ...]:
        return tuple((self.start_hour + i) % HOURS for i in range(HOURS))

    def to_json(self) -> dict:
        return {"source": self.source, "timezone": self.timezone, "start_hour": self.start_hour,
                **{name: list(getattr(self, name)) for name in LOADS}}


def load_curve(path: str | Path) -> LoadCurve:
    return from_dict(LoadCurve, read_json_object(path), str(path))


def _spread(total: float, weights: list[float]) -> list[int]:
    """Whole tokens per hour in proportion to weights that add up to round(total) exactly."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[:round(total) - sum(counts)]:
        counts[i] += 1
    return counts


def cosine_curve(stats: Stats, *, peak_to_mean: float, peak_hour: float, start_hour: int = 0,
                 timezone: str = "", source: str = "") -> LoadCurve:
    """A smooth day with the 24-hour totals of stats: each hour's load is proportional to
    1 + a cos(2 pi (t - peak_hour) / 24) at the hour's midpoint t, with a = peak_to_mean - 1."""
    if stats.window_hours != HOURS:
        raise EconomicsError(f"a day curve needs a {HOURS} h statistics window, got {stats.window_hours:g} h")
    amplitude = check("peak_to_mean", peak_to_mean, positive=True) - 1
    if not 0 <= amplitude < 1:  # from 2 up the trough hour would get no load or less
        raise EconomicsError(f"'peak_to_mean' must be in [1, 2), got {peak_to_mean}")
    weights = [1 + amplitude * math.cos(2 * math.pi * (start_hour + i + 0.5 - peak_hour) / HOURS)
               for i in range(HOURS)]
    return LoadCurve(*(_spread(getattr(stats, name), weights) for name in LOADS),
                     start_hour=start_hour, timezone=timezone, source=source)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Nodes per role for each hour of a curve; the rest of the cluster goes back to training."""
    clock_hours: tuple[int, ...]
    prefill_nodes: tuple[int, ...]
    decode_nodes: tuple[int, ...]
    cluster_nodes: int

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(p + d for p, d in zip(self.prefill_nodes, self.decode_nodes))

    @property
    def freed_nodes(self) -> tuple[int, ...]:
        return tuple(self.cluster_nodes - n for n in self.nodes)

    @property
    def node_hours(self) -> int:
        return sum(self.nodes)  # one plan point per hour

    @property
    def peak_nodes(self) -> int:
        return max(self.nodes)

    @property
    def average_nodes(self) -> float:
        return self.node_hours / HOURS


def _nodes(tokens_per_hour: float, tokens_per_s_per_node: float, headroom: float, minimum: int) -> int:
    return max(minimum, math.ceil(headroom * tokens_per_hour / (3600 * tokens_per_s_per_node)))


def plan_day(curve: LoadCurve, prefill_tokens_per_s_per_node: float, decode_tokens_per_s_per_node: float,
             cluster_nodes: int, *, headroom: float = 1.0, min_nodes: int = 1) -> Plan:
    """Runs, each hour, the fewest nodes of each role that serve headroom x that hour's load (at
    least min_nodes each, so the service never goes dark); fails if some hour needs more than the cluster."""
    check("prefill_tokens_per_s_per_node", prefill_tokens_per_s_per_node, positive=True)
    check("decode_tokens_per_s_per_node", decode_tokens_per_s_per_node, positive=True)
    check("cluster_nodes", cluster_nodes, positive=True, integer=True)
    check("min_nodes", min_nodes, integer=True)
    if check("headroom", headroom) < 1:
        raise EconomicsError(f"'headroom' must be >= 1 (it multiplies the load), got {headroom}")
    prefill = tuple(_nodes(t, prefill_tokens_per_s_per_node, headroom, min_nodes) for t in curve.input_tokens)
    decode = tuple(_nodes(t, decode_tokens_per_s_per_node, headroom, min_nodes) for t in curve.output_tokens)
    plan = Plan(curve.clock_hours, prefill, decode, cluster_nodes)
    busiest = plan.nodes.index(plan.peak_nodes)
    if plan.peak_nodes > cluster_nodes:
        raise EconomicsError(f"hour {plan.clock_hours[busiest]:02d}:00 needs {prefill[busiest]} prefill + "
                             f"{decode[busiest]} decode nodes, more than the cluster's {cluster_nodes}")
    return plan


def average_need(curve: LoadCurve, prefill_tokens_per_s_per_node: float,
                 decode_tokens_per_s_per_node: float) -> tuple[float, float]:
    """Prefill and decode nodes the day's load keeps busy on average: the plan's floor, before any
    rounding up to whole nodes per hour, headroom or minimum."""
    seconds = HOURS * 3600
    return (sum(curve.input_tokens) / seconds / prefill_tokens_per_s_per_node,
            sum(curve.output_tokens) / seconds / decode_tokens_per_s_per_node)


def plan_stats(curve: LoadCurve, plan: Plan, gpus_per_node: int, prefill_tokens_per_s_per_node: float,
               decode_tokens_per_s_per_node: float) -> Stats:
    """The planned day as a statistics record, so serving.economics prices it like a measured one."""
    return Stats(window_hours=HOURS, gpus_per_node=gpus_per_node, average_nodes=plan.average_nodes,
                 peak_nodes=plan.peak_nodes, **{name: sum(getattr(curve, name)) for name in LOADS},
                 prefill_tokens_per_s_per_node=prefill_tokens_per_s_per_node,
                 decode_tokens_per_s_per_node=decode_tokens_per_s_per_node)


def draw(curve: LoadCurve, plan: Plan, path: str | Path, title: str = "") -> None:
    """The day as a PNG: load on top, nodes per role and nodes freed for training below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    load, nodes = fig.subplots(2, 1, sharex=True)
    x = range(HOURS)
    for values, label in ((curve.input_tokens, "input (all)"), (curve.input_tokens_cache_miss, "input, cache miss"),
                          (curve.output_tokens, "output")):
        load.plot(x, [v / 3600 / 1e6 for v in values], marker="o", label=label)
    load.set_ylabel("million tokens/s")
    load.set_ylim(bottom=0)
    load.legend(loc="upper left", bbox_to_anchor=(1, 1))
    load.set_title(title)
    nodes.bar(x, plan.prefill_nodes, label="prefill")
    nodes.bar(x, plan.decode_nodes, bottom=plan.prefill_nodes, label="decode")
    nodes.bar(x, plan.freed_nodes, bottom=plan.nodes, color="0.85", label="freed for training")
    nodes.set_ylabel(f"nodes (cluster {plan.cluster_nodes})")
    nodes.set_xticks(list(x), [f"{h:02d}" for h in plan.clock_hours])
    nodes.set_xlabel(f"hour starting ({curve.timezone})" if curve.timezone else "hour starting")
    nodes.legend(loc="upper left", bbox_to_anchor=(1, 1))
    fig.savefig(path, dpi=100)


def follow(llm, plan: Plan, hour: int, gpus_per_node: int) -> tuple[int, int]:
    """Resizes a disaggregated deployment to the plan's hour, one dp rank per GPU: the nodes the plan
    frees go back to the spare pool (training); returns the (prefill, decode) dp sizes now serving."""
    sizes = plan.prefill_nodes[hour] * gpus_per_node, plan.decode_nodes[hour] * gpus_per_node
    llm.resize(prefill=sizes[0], decode=sizes[1])
    return sizes
