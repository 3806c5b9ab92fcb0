"""Demo: load a DeepSeek-V3-architecture checkpoint onto a deployment's mesh (default: 8 devices,
DP attention + EP experts with FP8 dispatch), prefill prompts into the latent KV cache and decode
greedily with the absorbed MLA form, then check the tokens against a teacher-forced full forward. Without --model it uses configs/tiny with seeded random weights, written once in
DeepSeek's FP8 release format under .cache/ (the trained default model is not embedded yet)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def default_model() -> Path:
    from flax import nnx

    from model import DeepseekV3, ModelConfig
    from model.checkpoint import save_safetensors
    path = ROOT / ".cache" / "tiny-random-fp8"
    if not (path / "model.safetensors.index.json").is_file():
        print(f"[demo] writing a seeded random tiny model to {path} (FP8 release format)", file=sys.stderr)
        save_safetensors(DeepseekV3(ModelConfig.from_json(ROOT / "configs/tiny/config.json"), rngs=nnx.Rngs(0)),
                         path, fp8=True)
    return path


def generate(net, prompts: list[list[int]], max_tokens: int):
    """Greedy generation for a batch of prompts of different lengths; returns tokens and timings."""
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    cache = net.init_cache(len(prompts), int(lengths.max()) + max_tokens)
    t0 = time.perf_counter()
    logits, cache = net.prefill(tokens, lengths, cache)
    nxt = np.argmax(np.asarray(logits)[np.arange(len(prompts)), lengths - 1], axis=-1)
    t_prefill = time.perf_counter() - t0
    out, step_times = [nxt], []
    for step in range(max_tokens - 1):
        t0 = time.perf_counter()
        logits, cache = net.decode(nxt, lengths + step, cache)
        nxt = np.argmax(np.asarray(logits), axis=-1)
        step_times.append(time.perf_counter() - t0)
        out.append(nxt)
    # The first decode step compiles; the rest show the steady state.
    return np.stack(out, axis=1), t_prefill, step_times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, help="HF checkpoint directory or one written by DeepseekV3.save")
    ap.add_argument("--prompt", action="append", help="comma-separated token ids (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--deployment", default=str(ROOT / "configs/deploy/cpu8.json"),
                    help="deployment file (mesh, EP, dispatch precision); 'none' for one device")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error(f"--max-tokens must be >= 1, got {args.max_tokens}")

    from model import DeepseekV3
    path = args.model or default_model()
    t0 = time.perf_counter()
    deployment = None if args.deployment == "none" else args.deployment
    net = DeepseekV3.from_pretrained(path, deployment=deployment)
    t_load = time.perf_counter() - t0
    try:
        prompts = [[int(t) for t in p.split(",")] for p in (args.prompt or ["5,17,42,7", "9,3"])]
    except ValueError:
        ap.error("--prompt takes comma-separated integer token ids, e.g. --prompt 5,17,42")
    for p in prompts:
        net.check_tokens(np.array([p]))
    generated, t_prefill, step_times = generate(net, prompts, args.max_tokens)
    steady = step_times[1:] or step_times
    # Greedy decoding must agree with the full forward's argmax over the finished sequence.
    consistent = True
    for p, g in zip(prompts, generated):
        full = np.asarray(net(np.array([p + list(g)], np.int32)))[0]
        consistent &= bool(np.array_equal(np.argmax(full[len(p) - 1:-1], axis=-1), g))
    result = {
        "model": str(path), "deployment": args.deployment, "load_s": round(t_load, 3), "prefill_s": round(t_prefill, 3),
        "decode_first_step_s": round(step_times[0], 3) if step_times else None,
        "decode_ms_per_step": round(1000 * float(np.median(steady)), 2) if steady else None,
        "outputs": [{"prompt": p, "generated": [int(t) for t in g]} for p, g in zip(prompts, generated)],
        "decode_matches_full_forward": consistent,
    }
    if args.json:
        print(json.dumps(result))
    else:
        where = "one device" if net.ep is None else (
            f"mesh {dict(net.ep.mesh.shape)} (EP{net.ep.ranks}, {net.n_physical_experts} physical experts, "
            f"{net.ep.dispatch_dtype} dispatch, {net.ep.combine_dtype} combine)")
        print(f"model {path} loaded in {t_load:.2f}s onto {where}")
        for o in result["outputs"]:
            print(f"prompt {o['prompt']} -> {o['generated']}")
        print(f"prefill {t_prefill:.2f}s and first decode step {result['decode_first_step_s']}s (both compile), "
              f"then {result['decode_ms_per_step']} ms per decode step (median)")
        print(f"greedy decode == teacher-forced full forward: {consistent}")
    return 0 if consistent else 1


if __name__ == "__main__":
    sys.exit(main())
