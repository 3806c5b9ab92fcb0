"""Expert-parallel load balancer (EPLB): which experts to replicate, and on which GPU each replica sits.

Same contract as DeepSeek's open-source EPLB (github.com/deepseek-ai/EPLB): per-layer loads of the
logical experts in, (phy2log, log2phy, logcnt) out. Physical slots are laid out GPU by GPU (GPU g
holds slots [g*k, (g+1)*k), k = replicas per GPU) and a node holds consecutive GPUs. A logical
expert's load is split evenly over its replicas; the goal is a low max GPU load.

Within one placement problem (a node, or all GPUs):
1. replication: DeepSeek's greedy (each redundant slot goes to the expert with the largest load per
   replica), and variants that stop it up to 8 slots early and spread the rest over the coldest
   experts. The variants matter when a hot expert gets more replicas than the GPUs can keep apart,
   or two hot experts compete for the same GPUs;
2. packing: longest-processing-time first into GPUs of equal slot count, for every variant; the
   variant whose heaviest GPU is lightest wins;
3. local search: swap a replica of the heaviest GPU with one elsewhere while that lowers it.
Hierarchical policy: every way of splitting the groups evenly over the nodes is tried (105 for 8
groups on 4 nodes), solving each distinct node once; the split whose worst node is lightest wins.
DeepSeek's split (groups packed by load) and DeepSeek's replication are always among the
candidates, so the result is never worse than theirs up to LPT tie-breaking.

Axes: L layers, E logical experts, R physical slots, G GPUs, k = R // G; B independent
problems, m experts and S slots per problem, V replication variants.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

POLICIES = ("auto", "hierarchical", "global")
_VARIANTS = 9  # DeepSeek's replication and the 8 early stops
_MAX_PARTITIONS = 1000  # beyond this many group-to-node splits, keep DeepSeek's split only


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      *, policy: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [L, E] non-negative loads -> phy2log [L, R], log2phy [L, E, R-E+1] (-1 padded),
    logcnt [L, E], all int64. policy "auto" is hierarchical when num_groups % num_nodes == 0
    (prefill), global otherwise (decode)."""
    w = _checked(weight, num_replicas, num_groups, num_nodes, num_gpus, policy)
    if policy == "global" or (policy == "auto" and num_groups % num_nodes):
        num_groups = num_nodes = 1
    phy2log = _rebalance(w, num_replicas, num_groups, num_nodes, num_gpus)
    num_layers, num_logical = w.shape
    logcnt = np.stack([np.bincount(row, minlength=num_logical) for row in phy2log])
    return phy2log, _log2phy(phy2log, num_logical, num_replicas - num_logical + 1), logcnt


def gpu_loads(weight, phy2log, logcnt, num_gpus: int) -> np.ndarray:
    """[L, G]: each GPU's share of the load, a logical expert's load split evenly over its replicas."""
    w = np.asarray(weight, np.float64)
    phy2log, logcnt = np.asarray(phy2log), np.asarray(logcnt)
    if w.ndim != 2 or logcnt.shape != w.shape or phy2log.ndim != 2 or len(phy2log) != len(w):
        raise ValueError(f"shapes do not fit: weight {w.shape}, phy2log {phy2log.shape}, logcnt {logcnt.shape}")
    if phy2log.shape[1] % num_gpus:
        raise ValueError(f"{phy2log.shape[1]} physical experts are not divisible by num_gpus={num_gpus}")
    per_replica = np.take_along_axis(w / np.maximum(logcnt, 1), phy2log, axis=1)  # [L, R]
    return per_replica.reshape(len(w), num_gpus, -1).sum(-1)


def balancedness(weight, phy2log, logcnt, num_gpus: int) -> np.ndarray:
    """[L]: max / mean GPU load per layer (1 = perfect; a layer without load counts as 1)."""
    loads = gpu_loads(weight, phy2log, logcnt, num_gpus)
    mean = loads.mean(-1)
    return np.divide(loads.max(-1), mean, out=np.ones_like(mean), where=mean > 0)


def _checked(weight, num_replicas, num_groups, num_nodes, num_gpus, policy) -> np.ndarray:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    counts = dict(num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus)
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    w = np.asarray(weight)
    if w.dtype.kind not in "biuf":
        raise ValueError(f"weight must hold real numbers, got dtype {w.dtype}")
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weight must be 2-D [layers, logical experts] and non-empty, got shape {w.shape}")
    w = w.astype(np.float64)
    if not np.isfinite(w).all():
        raise ValueError("weight contains non-finite loads (nan or inf)")
    if (w < 0).any():
        raise ValueError("weight contains negative loads")
    num_logical = w.shape[1]
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not divisible by num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not divisible by num_nodes={num_nodes}")
    if num_replicas < num_logical:
        raise ValueError(f"num_replicas={num_replicas} is fewer than the {num_logical} logical experts")
    if num_logical % num_groups:
        raise ValueError(f"the {num_logical} logical experts are not divisible by num_groups={num_groups}")
    if policy == "hierarchical" and num_groups % num_nodes:
        raise ValueError(f"the hierarchical policy needs num_groups={num_groups} divisible by num_nodes={num_nodes}")
    return w


def _rebalance(w, num_replicas, num_groups, num_nodes, num_gpus) -> np.ndarray:
    """[L, E] -> phy2log [L, R]: groups split over nodes, each node placed on its own GPUs."""
    num_layers, num_logical = w.shape
    group_size = num_logical // num_groups
    subsets, partitions = _group_splits(w.reshape(num_layers, num_groups, group_size).sum(-1), num_nodes)
    # subsets [L, Q, groups per node]: the node contents worth solving; partitions [P, N] index Q.
    experts = (subsets[..., None] * group_size + np.arange(group_size)).reshape(num_layers, len(subsets[0]), -1)
    layer_rows = np.arange(num_layers)[:, None, None]
    node_weight = w[layer_rows, experts]  # [L, Q, E/N]
    slots, peak = _place(node_weight.reshape(-1, experts.shape[-1]), num_replicas // num_nodes,
                         num_gpus // num_nodes)
    slots = slots.reshape(num_layers, -1, slots.shape[-1])  # [L, Q, R/N] index into the node's experts
    peak = peak.reshape(num_layers, -1)  # [L, Q]
    chosen = partitions[peak[:, partitions].max(-1).argmin(-1)]  # [L, N] subset of each node
    node_experts = experts[layer_rows[..., 0], chosen]  # [L, N, E/N]
    node_slots = slots[layer_rows[..., 0], chosen]  # [L, N, R/N]
    return np.take_along_axis(node_experts, node_slots, -1).reshape(num_layers, num_replicas)


def _group_splits(group_load, num_nodes):
    """group_load [L, n] -> (subsets [L, Q, n/N], partitions [P, N]): every even split of the
    groups over the nodes when there are few, else DeepSeek's (groups packed by load) per layer."""
    num_layers, n = group_load.shape
    size = n // num_nodes
    count = math.factorial(n) // (math.factorial(size) ** num_nodes * math.factorial(num_nodes))
    if count > _MAX_PARTITIONS:
        node = _lpt(group_load, num_nodes)  # [L, n]
        subsets = np.argsort(node, -1, kind="stable").reshape(num_layers, num_nodes, size)
        return subsets, np.arange(num_nodes)[None]
    splits = list(_even_splits(tuple(range(n)), size))
    blocks = sorted({block for split in splits for block in split})
    index = {block: q for q, block in enumerate(blocks)}
    partitions = np.array([[index[block] for block in split] for split in splits])
    return np.broadcast_to(np.array(blocks), (num_layers, len(blocks), size)), partitions


def _even_splits(items, size):
    """Splits of `items` into unordered blocks of `size`; each block starts with its smallest item."""
    if not items:
        yield ()
        return
    for others in itertools.combinations(items[1:], size - 1):
        block = (items[0], *others)
        rest = tuple(i for i in items if i not in block)
        for tail in _even_splits(rest, size):
            yield (block, *tail)


def _place(w, num_slots, num_gpus) -> tuple[np.ndarray, np.ndarray]:
    """w [B, m] -> (slots [B, S] expert of each slot, GPU by GPU; peak [B] heaviest GPU load)."""
    batch, m = w.shape
    counts = _replica_counts(w, num_slots).reshape(-1, m)  # [V*B, m], variant-major
    experts = np.repeat(np.tile(np.arange(m), len(counts)), counts.ravel()).reshape(-1, num_slots)
    per_replica = np.take_along_axis(np.tile(w, (_VARIANTS, 1)) / counts, experts, -1)  # [V*B, S]
    gpu = _lpt(per_replica, num_gpus)
    by_gpu = np.argsort(gpu, -1, kind="stable")  # each GPU holds exactly S/G consecutive entries
    slot_load = np.take_along_axis(per_replica, by_gpu, -1).reshape(_VARIANTS, batch, num_gpus, -1)
    slot_expert = np.take_along_axis(experts, by_gpu, -1).reshape(_VARIANTS, batch, num_gpus, -1)
    best = slot_load.sum(-1).max(-1).argmin(0)  # [B]; ties keep DeepSeek's replication (variant 0)
    rows = np.arange(batch)
    slot_load, slot_expert = slot_load[best, rows], slot_expert[best, rows]  # [B, G, k]
    _swap_search(slot_load, slot_expert)
    return slot_expert.reshape(batch, num_slots), slot_load.sum(-1).max(-1)


def _replica_counts(w, num_slots) -> np.ndarray:
    """w [B, m] -> counts [V, B, m]. Variant 0: DeepSeek's greedy; variant v: the greedy stopped v
    slots early, the remaining v slots spread over the coldest experts (where they cost least)."""
    batch, m = w.shape
    redundant = num_slots - m
    counts = np.ones((batch, m), np.int64)
    rows = np.arange(batch)
    coldness = np.argsort(np.argsort(w, -1, kind="stable"), -1)  # 0 = coldest
    variants = {}
    for placed in range(redundant + 1):
        rest = redundant - placed
        if rest < _VARIANTS:
            variants[rest] = counts + rest // m + (coldness < rest % m)
        if placed < redundant:
            counts[rows, (w / counts).argmax(-1)] += 1
    # fewer redundant slots than variants: repeat the pure greedy so every problem has V variants
    return np.stack([variants.get(v, variants[0]) for v in range(_VARIANTS)])


def _lpt(items, num_packs) -> np.ndarray:
    """items [B, S] -> pack [B, S]: heaviest first into the lightest pack that still has room,
    every pack getting S / num_packs items (DeepSeek's balanced_packing, vectorised over B)."""
    batch, size = items.shape
    room = size // num_packs
    order = np.argsort(-items, -1, kind="stable")  # [B, S]
    rows = np.arange(batch)
    pack = np.empty((batch, size), np.int64)
    pack[rows[:, None], order[:, :num_packs]] = np.arange(num_packs)  # the heaviest open one pack each
    load = np.take_along_axis(items, order[:, :num_packs], -1)  # [B, packs]
    fill = np.ones((batch, num_packs), np.int64)
    open_load = np.where(fill < room, load, np.inf)  # full packs never win the argmin
    for t in range(num_packs, size):
        item = order[:, t]
        p = open_load.argmin(-1)
        pack[rows, item] = p
        fill[rows, p] += 1
        open_load[rows, p] = np.where(fill[rows, p] < room, open_load[rows, p] + items[rows, item], np.inf)
    return pack


def _swap_search(slot_load, slot_expert, max_rounds: int = 256) -> None:
    """In place on [B, G, k]: while swapping one replica of the heaviest GPU with one on another
    GPU leaves both below the old peak, make the best such swap. Each swap strictly lowers the
    heaviest GPU without creating a new one as heavy, so the peak never rises."""
    active = np.arange(len(slot_load))
    num_gpus, per_gpu = slot_load.shape[1:]
    for _ in range(max_rounds):
        if not active.size:
            return
        rows = np.arange(active.size)
        items = slot_load[active]  # [b, G, k]
        load = items.sum(-1)  # [b, G]
        a = load.argmax(-1)
        peak = load[rows, a]
        moved = items[rows, a][:, :, None, None] - items[:, None]  # [b, k, G, k] load leaving a
        after = np.maximum(peak[:, None, None, None] - moved, load[:, None, :, None] + moved)
        after[rows, :, a, :] = np.inf
        flat = after.reshape(active.size, -1).argmin(-1)
        better = after.reshape(active.size, -1)[rows, flat] < peak * (1 - 1e-12)
        active, a, flat = active[better], a[better], flat[better]
        p, g, q = np.unravel_index(flat, (per_gpu, num_gpus, per_gpu))
        for arr in (slot_load, slot_expert):
            arr[active, a, p], arr[active, g, q] = arr[active, g, q], arr[active, a, p].copy()


def _log2phy(phy2log, num_logical, width) -> np.ndarray:
    """phy2log [L, R] -> [L, E, width]: each expert's slots in increasing order, then -1."""
    num_layers, num_replicas = phy2log.shape
    order = np.argsort(phy2log, -1, kind="stable")  # slots grouped by expert, ascending within
    expert = np.take_along_axis(phy2log, order, -1)
    first = np.searchsorted if False else None
    starts = np.stack([np.searchsorted(row, row, side="left") for row in expert])
    out = np.full((num_layers, num_logical, width), -1, np.int64)
    out[np.arange(num_layers)[:, None], expert, np.arange(num_replicas) - starts] = order
    return out
