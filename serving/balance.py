"""Placement of requests on dp ranks: DeepSeek's prefill and decode load balancers.

Attention is data-parallel, so a rank that holds more work than the others makes every rank wait
for it at the next expert all-to-all. Each balancer equalises two per-rank quantities at once:

- prefill: core-attention work (sum over new tokens of the context each attends over; cache hits
  excluded) and input tokens (the dispatch send volume), counting work placed but not yet computed;
- decode: KV-cache tokens in use (attention reads) and running requests (the batch each rank steps).

A request goes to the rank where, after adding it, its larger quantity-to-mean ratio is smallest.
Round-robin placement is kept as the baseline the balancers are measured against.
"""

from __future__ import annotations

import numpy as np

from sharding.deployment import PLACEMENTS as POLICIES  # the deployment file's serving.placement


def core_attention(prompt_len: int, cached: int) -> int:
    """Causal attention work of computing positions [cached, prompt_len): position p attends p + 1 rows."""
    return (prompt_len * (prompt_len + 1) - cached * (cached + 1)) // 2


class Balancer:
    """Chooses a rank for each request from the ranks' current loads [R, K] and the request's cost
    on each rank [R, K] (costs differ between ranks when one of them holds a cached prefix)."""

    def __init__(self, policy: str = "balanced"):
        if policy not in POLICIES:
            raise ValueError(f"serving.placement {policy!r} is not one of {POLICIES}")
        self.policy = policy
        self._next = 0  # round-robin cursor

    def choose(self, loads: np.ndarray, costs: np.ndarray, allowed: np.ndarray) -> int | None:
        """The rank for this request (None: no rank is allowed to take it now)."""
        ranks = np.flatnonzero(allowed)
        if not len(ranks):
            return None
        if self.policy == "round_robin":
            rank = min(ranks, key=lambda r: (r - self._next) % len(allowed))
            self._next = (rank + 1) % len(allowed)
            return int(rank)
        best, best_key = None, None
        for r in ranks:
            after = loads.copy()
            after[r] += costs[r]
            mean = after.mean(0)
            own = np.max(after[r] / np.where(mean > 0, mean, 1))
            key = (own, float(costs[r].sum()))  # ties: the rank that needs the least work (a cached prefix)
            if best_key is None or key < best_key:
                best, best_key = int(r), key
        return best


class Balancedness:
    """max / mean over ranks of one per-rank quantity, sampled over time (1.0 = perfectly even).

    `overall` weighs each sample by the load at stake (sum of maxima / sum of means): the time the
    busiest rank needs over the time an even split would need, so nearly idle moments (a lone
    request at start-up or drain) do not swamp the figure; `mean` is the plain average of samples."""

    def __init__(self):
        self.samples: list[float] = []
        self._max_sum = self._mean_sum = 0.0

    def record(self, per_rank) -> None:
        per_rank = [float(v) for v in per_rank]  # a few ranks: plain Python beats numpy's per-call cost
        mean = sum(per_rank) / len(per_rank) if per_rank else 0.0
        if mean > 0:
            top = max(per_rank)
            self.samples.append(top / mean)
            self._max_sum += top
            self._mean_sum += mean

    def summary(self) -> dict:
        s = self.samples
        if not s:
            return {"samples": 0}
        return {"samples": len(s), "overall": self._max_sum / self._mean_sum, "mean": float(np.mean(s)),
                "p90": float(np.percentile(s, 90)), "max": float(np.max(s)), "last": s[-1]}
