"""EPLB balancedness report: per-GPU expert load before vs after a rebalance, as JSON and a PNG.

Loads come from a real engine run (the default model on a CPU-mesh deployment, routing real
prompts), or, with --zipf ALPHA, from DeepSeek-scale synthetic loads (58 layers x 256 experts,
Zipf popularity) placed on the deployment's GPUs.

    python scripts/eplb_report.py --out eplb_report --json
    python scripts/eplb_report.py --zipf 1.0 --deployment configs/deploy/deepseek-decode-ep144.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def engine_loads(model, deployment: str, requests: int, tokens: int):
    """Logical loads [L, E] and the placement in force, from serving real prompts."""
    import numpy as np

    from serving import LLM, SamplingParams
    from sharding.eplb import logical_loads
    llm = LLM(model, deployment=deployment)
    rng = np.random.default_rng(0)
    vocab = llm.engine.net.config.vocab_size
    llm.generate([rng.integers(2, vocab, int(rng.integers(4, 32))).tolist() for _ in range(requests)],
                 SamplingParams(max_tokens=tokens, ignore_eos=True))
    mlp = llm.engine.net.moe_layers.mlp
    phy2log, logcnt = np.asarray(mlp.phy2log[...]), np.asarray(mlp.logcnt[...])
    weight = logical_loads(np.asarray(llm.engine.expert_load), phy2log, llm.engine.net.config.n_routed_experts)
    dep = llm.deployment
    return weight, phy2log, logcnt, dep, llm.engine.net.config.n_group


def zipf_case(alpha: float, deployment: str):
    from model.moe import default_placement
    from sharding.deployment import Deployment
    from sharding.eplb import zipf_loads
    import numpy as np
    dep = Deployment.from_json(deployment)
    weight = zipf_loads(alpha)
    placement = default_placement(weight.shape[1], dep.n_physical_experts(weight.shape[1]))
    layers = len(weight)
    return (weight, np.tile(placement["phy2log"], (layers, 1)), np.tile(placement["logcnt"], (layers, 1)), dep, 8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployment", default=str(ROOT / "configs/deploy/cpu8.json"))
    ap.add_argument("--model", help="checkpoint for the engine run (default: the embedded tiny model)")
    ap.add_argument("--zipf", type=float, help="use synthetic Zipf(alpha) loads at DeepSeek's scale instead")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default="eplb_report", help="writes OUT.json and OUT.png")
    ap.add_argument("--json", action="store_true", help="print the JSON report")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("PJRT_NPROC", "16")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sharding.eplb import balancedness, gpu_loads, rebalance_experts
    if args.zipf is not None:
        weight, phy2log, logcnt, dep, groups = zipf_case(args.zipf, args.deployment)
        source = f"zipf alpha={args.zipf}"
    else:
        sys.path.insert(0, str(ROOT / "scripts"))
        from demo import default_model
        weight, phy2log, logcnt, dep, groups = engine_loads(args.model or default_model(), args.deployment,
                                                           args.requests, args.tokens)
        source = f"engine run: {args.requests} requests x {args.tokens} tokens"
    gpus = dep.ep_size
    new_phy2log, _, new_logcnt = rebalance_experts(weight, phy2log.shape[1], groups, dep.nodes, gpus)
    before, after = balancedness(weight, phy2log, logcnt, gpus), balancedness(weight, new_phy2log, new_logcnt, gpus)
    load_before = gpu_loads(weight, phy2log, logcnt, gpus).sum(0)
    load_after = gpu_loads(weight, new_phy2log, new_logcnt, gpus).sum(0)
    report = {
        "source": source, "deployment": dep.name, "gpus": gpus, "physical_experts": int(phy2log.shape[1]),
        "layers": len(weight), "balancedness_before": float(before.mean()), "balancedness_after": float(after.mean()),
        "per_layer_before": before.tolist(), "per_layer_after": after.tolist(),
        "gpu_load_before": load_before.tolist(), "gpu_load_after": load_after.tolist(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(gpus)
    a.bar(x - 0.2, load_before, 0.4, label=f"before ({before.mean():.3f})")
    a.bar(x + 0.2, load_after, 0.4, label=f"after ({after.mean():.3f})")
    a.axhline(load_before.mean(), color="k", lw=0.8, ls="--", label="mean")
    a.set(xlabel="GPU", ylabel="tokens (summed over layers)", title=f"{dep.name}: per-GPU load")
    a.legend()
    b.plot(before, label="before")
    b.plot(after, label="after")
    b.set(xlabel="MoE layer", ylabel="max / mean GPU load", title=source)
    b.legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=100)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if not k.startswith(("per_layer", "gpu_load"))}))
    else:
        print(f"{source} on {dep.name}: max/mean GPU load {before.mean():.3f} -> {after.mean():.3f} "
              f"(mean over {len(weight)} layers); wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
