"""The expert-parallel layout as data: EPConfig (which mesh axes hold the experts, what travels on
the wire, the capacity buckets, the overlap schedule) and the capacity arithmetic.

The compute (dispatch, experts, combine as shard_maps) is model/ep.py's; the overlap schedules are
model/overlap.py's. This module holds only what a deployment decides.

Axis legend: n tokens per rank, k experts per token, R ranks in the EP group, El physical experts
per rank, C rows one rank sends another, Ce rows per local expert.
"""

from __future__ import annotations

import dataclasses
import math

from jax.sharding import Mesh

# What the dispatch may send ("auto": what the expert GEMMs consume: FP8 rows + scales for FP8
# experts, else the activations as they are) and what the combine may return ("auto": the activations' dtype).
DISPATCH_DTYPES = ("auto", "fp8", "bf16", "fp32")
COMBINE_DTYPES = ("auto", "bf16", "fp32")
OVERLAPS = ("none", "auto", "two_batch", "five_stage")  # model/overlap.py
TRANSPORTS = ("padded", "ragged")  # model/ep.py's EXCHANGES
ROW_ALIGN = 8  # capacities are rounded up to this, so nearby batch sizes share one compilation


@dataclasses.dataclass(frozen=True)
class EPConfig:
    mesh: Mesh
    axes: tuple[str, ...] = ("dp", "tp")  # experts sharded over all of these (DeepSeek: every device)
    batch_axis: str = "dp"  # tokens arrive sharded over this axis (DP attention)
    dispatch_dtype: str = "auto"
    combine_dtype: str = "auto"
    # Capacity buckets as multiples of the expected load; None = the worst case, which cannot
    # overflow, so the last bucket always completes the step.
    capacity_factors: tuple[float | None, ...] = (2.0, 4.0, None)
    level: int = 0
    # the deployment's kernels.transport, resolved for its platform (model/kernels/registry.py)
    transport: str = "padded"  # padded | ragged (ragged_all_to_all: GPU; XLA:CPU lacks it)
    overlap: str = "none"  # none | auto | two_batch | five_stage: model/overlap.py

    def __post_init__(self):
        if self.overlap not in OVERLAPS:
            raise ValueError(f"overlap {self.overlap!r} must be 'none', 'auto', 'two_batch' or 'five_stage'")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r} must be one of {TRANSPORTS}")
        if self.dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(f"dispatch_dtype {self.dispatch_dtype!r} is not one of {sorted(DISPATCH_DTYPES)}")
        if self.combine_dtype not in COMBINE_DTYPES:
            raise ValueError(f"combine_dtype {self.combine_dtype!r} must be 'auto', 'bf16' or 'fp32'")
        if not self.capacity_factors or self.capacity_factors[-1] is not None:
            raise ValueError("capacity_factors must end with null (the bucket that cannot overflow)")
        if any(f is not None and f <= 0 for f in self.capacity_factors):
            raise ValueError(f"capacity_factors must be positive, got {self.capacity_factors}")

    @property
    def ranks(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.axes)

    @property
    def capacity_factor(self) -> float | None:
        return self.capacity_factors[self.level]

    @property
    def split_axes(self) -> tuple[tuple[str, ...], int]:
        """The EP axes besides the batch axis, and their size: the ranks of one dp group, which hold
        the same tokens and each dispatch 1/size of them."""
        other = tuple(a for a in self.axes if a != self.batch_axis)
        return other, math.prod(self.mesh.shape[a] for a in other)

    def escalated(self) -> "EPConfig | None":
        """The next capacity bucket, or None when this one already cannot overflow."""
        if self.level + 1 >= len(self.capacity_factors):
            return None
        return dataclasses.replace(self, level=self.level + 1)


def payload(ep: EPConfig, fp8_experts: bool) -> str:
    """What this layer sends: "fp8", "bf16", "fp32", or "auto" resolved (FP8 experts: "fp8"; else
    "auto", the activations as they are)."""
    if ep.dispatch_dtype == "auto" and fp8_experts:
        return "fp8"
    return ep.dispatch_dtype


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def capacities(n: int, k: int, ranks: int, experts_local: int, factor: float | None) -> tuple[int, int]:
    """(C, Ce) for n tokens per rank. Expected rows per destination: n * min(k, R) / R; expected
    (row, expert) pairs per local expert: n * k / El. The worst case bounds both."""
    worst_send, worst_expert = n, ranks * n
    if factor is None:
        return worst_send, worst_expert
    send = min(worst_send, _round_up(math.ceil(factor * n * min(k, ranks) / ranks), ROW_ALIGN))
    expert = min(ranks * send, _round_up(math.ceil(factor * n * k / experts_local), ROW_ALIGN))
    return send, expert
