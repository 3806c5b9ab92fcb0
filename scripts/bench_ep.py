"""Benchmark one expert-parallel MoE layer: dispatch + expert GEMMs + combine, per deployment.

Random weights at the given model config's shapes; the routing is the real gate's (random
weights give near-uniform expert loads). Reports the layer time, the expert compute alone, their
difference (the dispatch/combine cost), and bytes moved per layer per rank: what the padded
transport moves and what the rows actually needed.

    python scripts/bench_ep.py --deployment configs/deploy/cpu8.json --tokens-per-rank 256 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Figures that are not timed or counted directly, and what they are instead (the text output says so).
DERIVED = {
    "dispatch_combine_ms": "  (difference: layer_ms - experts_ms, not a measurement)",
    "bytes_moved_per_rank": "  (model: capacity buffer size x row bytes)",
    "bytes_needed_per_rank": "  (model: mean rows sent x row bytes)",
}


def _time(fn, *args, iters: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))  # one at a time: queued collectives can stall on CPU
    return (time.perf_counter() - start) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployment", default=str(ROOT / "configs/deploy/cpu8.json"))
    ap.add_argument("--model-config", default=str(ROOT / "configs/tiny/config.json"))
    ap.add_argument("--tokens-per-rank", type=int, default=256)
    ap.add_argument("--quantization", choices=("fp8", "none"), default="none",
                    help="the experts' weights: none (bf16) or fp8 (e4m3 + 128x128 scales; FP8 dispatch by default)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--cpu-devices", type=int, default=8, help="emulated CPU devices when no GPU is present")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ.setdefault("PJRT_NPROC", str(2 * args.cpu_devices))  # the emulated mesh needs it (docs/DESIGN_NOTES.md)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from model import ModelConfig
    from model.moe import MoE
    from sharding.deployment import Deployment
    from model.experts import grouped_ffn
    from model.ep import PAYLOAD_DTYPES, ep_routed_experts
    from sharding.ep import capacities, payload
    from sharding.mesh import param_shardings

    cfg = ModelConfig.from_json(args.model_config)
    dep = Deployment.from_json(args.deployment)
    mesh = dep.make_mesh()
    ep = dep.ep_config(mesh)
    P = dep.n_physical_experts(cfg.n_routed_experts)
    moe = MoE(cfg, jnp.bfloat16, nnx.Rngs(0), n_physical=P, fp8=args.quantization == "fp8")
    graphdef, state = nnx.split(moe)
    state = jax.device_put(state, param_shardings(state, mesh))
    moe = nnx.merge(graphdef, state)
    R, El, k, D = ep.ranks, P // ep.ranks, cfg.num_experts_per_tok, cfg.hidden_size
    N = args.tokens_per_rank * dep.dp
    x = jax.device_put(jax.random.normal(jax.random.key(1), (N, D), jnp.bfloat16),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("dp")))
    weights, ids = moe.gate(x)
    phys = moe.to_physical(ids)
    valid = jnp.ones((N,), bool)
    w = moe.experts.weights()

    layer = jax.jit(lambda x, phys, weights, w: ep_routed_experts(x, phys, weights, valid, w, ep))
    t_layer = _time(layer, x, phys, weights, w, iters=args.iters)
    _, stats = layer(x, phys, weights, w)

    n = args.tokens_per_rank // max(1, dep.tp)
    C, Ce = capacities(n, k, R, El, ep.capacity_factor)
    local = jax.tree.map(lambda a: jax.device_put(a[:El], jax.devices()[0]), w)
    rows = jax.random.normal(jax.random.key(2), (R * C, D), jnp.bfloat16)
    row_ids = jax.random.randint(jax.random.key(3), (R * C, k), -1, El)
    row_w = jnp.ones((R * C, k), jnp.float32)
    experts = jax.jit(lambda r, i, rw, w: grouped_ffn(r, i, rw, w, "masked", capacity=Ce))
    t_experts = _time(experts, rows, row_ids, row_w, local, iters=args.iters)

    def itemsize(dtype):  # "auto": the activations as they are (bf16 here)
        return np.dtype(jnp.bfloat16 if dtype == "auto" else PAYLOAD_DTYPES[dtype]).itemsize
    wire = payload(ep, w.fp8)
    row_dispatch = D * itemsize(wire) + (4 * -(-D // 128) if wire == "fp8" else 0) + 8 * k  # + ids, weights
    row_combine = D * itemsize(ep.combine_dtype)
    sent = np.asarray(stats["rows_sent"])
    result = {
        "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(), "deployment": dep.name,
        "transport": ep.transport, "dispatch": wire, "quantization": args.quantization, "ranks": R, "experts_per_rank": El, "tokens_per_rank": args.tokens_per_rank,
        "hidden": D, "top_k": k, "capacity_rows_per_peer": C, "capacity_rows_per_expert": Ce,
        "layer_ms": 1e3 * t_layer, "experts_ms": 1e3 * t_experts,
        "dispatch_combine_ms": 1e3 * max(t_layer - t_experts, 0.0),
        "bytes_moved_per_rank": int(R * C * (row_dispatch + row_combine)),
        "bytes_needed_per_rank": int(sent.mean() * (row_dispatch + row_combine)),
        "rows_sent_per_rank_mean": float(sent.mean()), "overflow": bool(stats["overflow"]),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            note = DERIVED.get(key, "")
            print(f"{key:>28}: {value:.3f}{note}" if isinstance(value, float) else f"{key:>28}: {value}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
