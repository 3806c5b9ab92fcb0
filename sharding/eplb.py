"""Expert-parallel load balancer (EPLB): which experts to replicate, and on which GPU each replica sits.

Same contract as DeepSeek's open-source EPLB (github.com/deepseek-ai/EPLB): per-layer loads of the
logical experts in, (phy2log, log2phy, logcnt) out. Physical slots are laid out GPU by GPU (GPU g
holds slots [g*k, (g+1)*k), k = replicas per GPU) and a node holds consecutive GPUs. A logical
expert's load is split evenly over its replicas; the aim is a low heaviest-GPU load.

Hierarchical policy (prefill): expert groups are packed onto nodes by load, as DeepSeek does, and
each node is then placed on its own GPUs, so a group's replicas never leave its node. Global policy
(decode): one placement over all GPUs. A placement problem is solved in three steps:
1. replication: DeepSeek's greedy (each redundant slot to the expert with the largest load per
   replica), plus variants that stop it up to 8 slots early and give the rest to the coldest
   experts. The greedy minimises the largest replica, which is not the heaviest GPU: a hot
   expert given more replicas than there are GPUs to keep them apart, or two hot experts
   competing for the same GPUs, put two big replicas on one GPU;
2. packing: longest-processing-time first into GPUs of equal slot count, for every variant; the
   variant whose heaviest GPU is lightest is kept;
3. local search: swap a replica of the heaviest GPU with one elsewhere while that lowers it.
Variant 0 is DeepSeek's replication and the packing is DeepSeek's, so the result is never worse
than theirs (up to how ties between equal loads are broken).

Where it pays (scripts/bench_eplb.py): skewed loads at prefill, e.g. Zipf alpha 1.2 gives 1.55
against the greedy's 1.98, where the heaviest node alone forces 1.54. At decode, with 2 replicas
per GPU, LPT pairs the heaviest replica with the lightest, which is optimal for given replica
counts, and an exact search over counts (a MILP, offline, on a few layers) beat the greedy's by
at most 3%: little is left to gain there.

Axes: L layers, E logical experts, R physical slots, G GPUs, N nodes; B independent placement
problems of m experts on S slots; V replication variants.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("auto", "hierarchical", "global")
_EARLY_STOPS = 8  # replication variants beyond DeepSeek's; more did not help on Zipf loads


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
    flat = phy2log + num_logical * np.arange(num_layers)[:, None]
    logcnt = np.bincount(flat.ravel(), minlength=num_layers * num_logical).reshape(num_layers, num_logical)
    return phy2log, _log2phy(phy2log, logcnt, num_replicas - num_logical + 1), logcnt


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
    """[L]: max / mean GPU load per layer (1 is perfect; a layer without load counts as 1)."""
    loads = gpu_loads(weight, phy2log, logcnt, num_gpus)
    mean = loads.mean(-1)
    return np.divide(loads.max(-1), mean, out=np.ones_like(mean), where=mean > 0)


def zipf_loads(alpha: float, num_layers: int = 58, num_experts: int = 256, tokens: int = 200_000,
               seed: int = 0) -> np.ndarray:
    """[L, E] synthetic loads for benchmarks and tests: expert popularity ~ 1 / rank**alpha, a
    fresh random expert order per layer, `tokens` expert choices per layer drawn multinomially."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_experts + 1) ** alpha
    p /= p.sum()
    loads = np.empty((num_layers, num_experts))
    for layer in loads:
        layer[rng.permutation(num_experts)] = rng.multinomial(tokens, p)
    return loads


def _checked(weight, num_replicas, num_groups, num_nodes, num_gpus, policy) -> np.ndarray:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    sizes = dict(num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus)
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    w = np.asarray(weight)
    if w.dtype.kind not in "biuf":
        raise ValueError(f"weight must hold real numbers, got dtype {w.dtype}")
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weight must be a non-empty 2-D [layers, logical experts] array, got shape {w.shape}")
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
    """[L, E] -> phy2log [L, R]: groups packed onto nodes by load, then each node on its GPUs.
    Packing groups by load is what bounds the heaviest node, and the heaviest node bounds its
    GPUs: trying all 105 splits of 8 groups over 4 nodes instead changed the result by < 0.02%."""
    num_layers, num_logical = w.shape
    group_size = num_logical // num_groups
    group_slot = _lpt(w.reshape(num_layers, num_groups, group_size).sum(-1), num_nodes)  # [L, groups]
    node_groups = np.empty_like(group_slot)  # [L, groups]: node n holds entries n*groups/N onwards
    np.put_along_axis(node_groups, group_slot, np.arange(num_groups), -1)
    experts = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers * num_nodes, -1)
    node_weight = np.take_along_axis(w, experts.reshape(num_layers, num_logical), -1)  # [L, E], node-major
    slots = _place(node_weight.reshape(experts.shape), num_replicas // num_nodes, num_gpus // num_nodes)
    return np.take_along_axis(experts, slots, -1).reshape(num_layers, num_replicas)


def _place(w, num_slots, num_gpus) -> np.ndarray:
    """w [B, m] -> [B, S]: the expert in each slot, GPU by GPU."""
    batch, m = w.shape
    counts = _replica_counts(w, num_slots)  # [V, B, m]
    variants = len(counts)
    counts = counts.reshape(-1, m)
    experts = np.repeat(np.tile(np.arange(m), len(counts)), counts.ravel()).reshape(-1, num_slots)
    per_replica = np.take_along_axis(np.tile(w, (variants, 1)) / counts, experts, -1)  # [V*B, S]
    slot = _lpt(per_replica, num_gpus)
    slot_load, slot_expert = np.empty_like(per_replica), np.empty_like(experts)
    np.put_along_axis(slot_load, slot, per_replica, -1)
    np.put_along_axis(slot_expert, slot, experts, -1)
    slot_load = slot_load.reshape(variants, batch, num_gpus, -1)
    slot_expert = slot_expert.reshape(variants, batch, num_gpus, -1)
    best = slot_load.sum(-1).max(-1).argmin(0)  # [B]; a tie keeps DeepSeek's replication
    rows = np.arange(batch)
    slot_load, slot_expert = slot_load[best, rows], slot_expert[best, rows]  # [B, G, S/G]
    _swap_search(slot_load, slot_expert)
    return slot_expert.reshape(batch, num_slots)


def _replica_counts(w, num_slots) -> np.ndarray:
    """w [B, m] -> counts [V, B, m]. Variant 0: DeepSeek's greedy; variant v: the greedy stopped v
    slots early and those v slots spread over the coldest experts, where they shift the least load."""
    batch, m = w.shape
    redundant = num_slots - m
    counts = np.ones((batch, m), np.int64)
    rows = np.arange(batch)
    coldness = np.argsort(np.argsort(w, -1, kind="stable"), -1)  # 0 = coldest
    variants = [None] * min(_EARLY_STOPS, redundant) + [None]
    for placed in range(redundant + 1):
        rest = redundant - placed
        if rest < len(variants):
            variants[rest] = counts + rest // m + (coldness < rest % m)
        if rest:
            counts[rows, (w / counts).argmax(-1)] += 1
    return np.stack(variants)


def _lpt(items, num_packs) -> np.ndarray:
    """items [B, S] -> slot [B, S] = pack * (S / num_packs) + rank in pack: heaviest first into
    the lightest pack that still has room (DeepSeek's balanced_packing, vectorised over B)."""
    batch, size = items.shape
    room = size // num_packs
    order = np.argsort(-items, -1, kind="stable")  # [B, S]
    heaviest = np.take_along_axis(items, order, -1).T.copy()  # [S, B], row t = t-th heaviest
    slot_by_rank = np.empty((size, batch), np.int64)
    slot_by_rank[:num_packs] = np.arange(num_packs)[:, None] * room  # the heaviest open one pack each
    # open_load [B, packs]: load of each pack, inf once full so it never wins the argmin
    open_load = heaviest[:num_packs].T.copy() if room > 1 else np.full((batch, num_packs), np.inf)
    flat_load = open_load.reshape(-1)
    fill = np.ones(batch * num_packs, np.int64)
    cell_base = np.arange(batch) * num_packs
    for t in range(num_packs, size):
        p = open_load.argmin(-1)
        cell = cell_base + p
        slot_by_rank[t] = p * room + fill[cell]
        fill[cell] += 1
        flat_load[cell] = np.where(fill[cell] < room, flat_load[cell] + heaviest[t], np.inf)
    slot = np.empty((batch, size), np.int64)
    np.put_along_axis(slot, order, slot_by_rank.T, -1)
    return slot


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
        after = load[:, None, :, None] + moved  # the other GPU's new load
        np.maximum(after, np.subtract(peak[:, None, None, None], moved, out=moved), out=after)
        after[rows, :, a, :] = np.inf
        after = after.reshape(active.size, -1)
        flat = after.argmin(-1)
        better = after[rows, flat] < peak * (1 - 1e-12)
        active, a, flat = active[better], a[better], flat[better]
        p, g, q = np.unravel_index(flat, (per_gpu, num_gpus, per_gpu))
        for arr in (slot_load, slot_expert):
            arr[active, a, p], arr[active, g, q] = arr[active, g, q], arr[active, a, p]


def _log2phy(phy2log, logcnt, width) -> np.ndarray:
    """phy2log [L, R], logcnt [L, E] -> [L, E, width]: each expert's slots in increasing order, then -1."""
    num_layers, num_replicas = phy2log.shape
    order = np.argsort(phy2log, -1, kind="stable")  # slots grouped by expert, ascending within
    expert = np.take_along_axis(phy2log, order, -1)
    first = np.take_along_axis(np.cumsum(logcnt, -1) - logcnt, expert, -1)  # where its run starts
    out = np.full((num_layers, logcnt.shape[1], width), -1, np.int64)
    out[np.arange(num_layers)[:, None], expert, np.arange(num_replicas) - first] = order
    return out


# ---- live rebalancing: measured loads (the weights are moved by model.moe.move_experts) -------------

def logical_loads(physical, phy2log, num_logical: int) -> np.ndarray:
    """Tokens per physical slot [L, R] -> per logical expert [L, E] (replicas summed)."""
    physical, phy2log = np.asarray(physical, np.float64), np.asarray(phy2log)
    out = np.zeros((len(physical), num_logical))
    np.add.at(out, (np.arange(len(physical))[:, None], phy2log), physical)
    return out
