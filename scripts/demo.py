"""Demo: the serving engine on a deployment's mesh (default: 8 devices, DP attention + EP experts)
answering checkable questions with the embedded model, models/jaxseek-tiny (a small
DeepSeek-V3-architecture model trained to reverse, sort and add digit strings; it ships in
DeepSeek's FP8 format). --quantization fp8 serves it as DeepSeek does: FP8 weights, FP8 GEMMs, FP8
dispatch; none (the default on a CPU) dequantises it. Every answer is checked; the engine's
statistics follow.

Without the embedded model (or with --model pointing at a checkpoint without a tokenizer) it runs
token-id prompts and checks greedy decoding against a teacher-forced full forward instead."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "models" / "jaxseek-tiny"


def default_model() -> Path:
    """The embedded trained model; failing that, a seeded random tiny model written once to .cache/."""
    if (EMBEDDED / "config.json").is_file():
        return EMBEDDED
    from flax import nnx

    from model import DeepseekV3, ModelConfig
    from model.checkpoint import save_safetensors
    path = ROOT / ".cache" / "tiny-random-fp8"
    if not (path / "model.safetensors.index.json").is_file():
        print(f"[demo] writing a seeded random tiny model to {path} (FP8 release format)", file=sys.stderr)
        save_safetensors(DeepseekV3(ModelConfig.from_json(ROOT / "configs/tiny/config.json"), rngs=nnx.Rngs(0)),
                         path, fp8=True)
    return path


def expected(question: str) -> str:
    op, arg = question.rstrip("=").split(" ", 1)
    if op == "reverse":
        return arg[::-1]
    if op == "sort":
        return "".join(sorted(arg))
    a, b = arg.split("+")
    return str(int(a) + int(b))


def questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    digits = lambda k: "".join(rng.choice("0123456789") for _ in range(k))  # noqa: E731
    out = []
    for i in range(n):
        kind = ("reverse", "sort", "add")[i % 3]
        out.append(f"add {rng.randint(0, 99)}+{rng.randint(0, 99)}=" if kind == "add"
                   else f"{kind} {digits(rng.randint(2, 8))}=")
    return out


def text_demo(llm, args) -> tuple[list[dict], bool]:
    from serving import SamplingParams
    qs = args.prompt or questions(args.questions, args.seed)
    outs = llm.generate(qs, SamplingParams(max_tokens=args.max_tokens))
    rows = [{"prompt": q, "answer": o.text, "expected": expected(q), "correct": o.text == expected(q)}
            for q, o in zip(qs, outs)]
    chat = llm.chat([{"role": "user", "content": "reverse 2025"}], SamplingParams(max_tokens=args.max_tokens))
    rows.append({"prompt": "chat: reverse 2025", "answer": chat.text, "expected": "5202", "correct": chat.text == "5202"})
    return rows, all(r["correct"] for r in rows)


def token_demo(llm, args) -> tuple[list[dict], bool]:
    from serving import SamplingParams
    prompts = [[5, 17, 42, 7], [9, 3], [60, 61, 62, 63, 64]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    net, rows = llm.engine.net, []
    for p, o in zip(prompts, outs):
        full = np.asarray(net(np.array([p + o.token_ids], np.int32)))[0]
        teacher = [int(t) for t in np.argmax(full[len(p) - 1:-1], axis=-1)]
        rows.append({"prompt": p, "answer": o.token_ids, "expected": teacher, "correct": teacher == o.token_ids})
    return rows, all(r["correct"] for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--deployment", default=str(ROOT / "configs/deploy/cpu8.json"),
                    help="deployment file (mesh, EP, dispatch precision, serving buckets)")
    ap.add_argument("--quantization", choices=("fp8", "none"),
                    help="fp8 or none (default: fp8 on a GPU for an FP8 checkpoint, none otherwise)")
    ap.add_argument("--prompt", action="append", help="a question such as 'sort 3141=' (repeatable)")
    ap.add_argument("--questions", type=int, default=12, help="random questions when no --prompt is given")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=2025)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error(f"--max-tokens must be >= 1, got {args.max_tokens}")

    from serving import LLM
    path = args.model or default_model()
    print(f"[demo] loading {path} onto {args.deployment} and compiling...", file=sys.stderr)
    t0 = time.perf_counter()
    llm = LLM(path, deployment=args.deployment, quantization=args.quantization)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows, ok = (text_demo if llm.tokenizer else token_demo)(llm, args)
    elapsed = time.perf_counter() - t0
    stats = llm.stats()
    summary = {"model": str(path), "deployment": llm.deployment.name, "quantization": stats["quantization"],
               "parameter_bytes": stats["parameter_bytes"], "load_s": round(t_load, 2),
               "generate_s": round(elapsed, 2), "results": rows, "all_correct": ok,
               "generated_tokens": stats["generated_tokens"], "compilations": stats["compilations"],
               "ttft_s": stats["ttft_s"], "eplb_balancedness": stats["eplb"].get("balancedness")}
    if args.json:
        print(json.dumps(summary))
        return 0 if ok else 1
    net = llm.engine.net
    ep = net.ep
    if ep is not None:  # what travels: "auto" resolved
        from sharding.ep import payload
        wire = {"auto": np.dtype(net.dtype).name}
        dispatch = payload(ep, net.quantization == "fp8")
        dispatch, combine = wire.get(dispatch, dispatch), wire.get(ep.combine_dtype, ep.combine_dtype)
    where = "one device" if ep is None else (f"mesh {dict(ep.mesh.shape)}: EP{ep.ranks}, "
                                             f"{net.n_physical_experts} physical experts, "
                                             f"{dispatch} dispatch, {combine} combine")
    print(f"{path.name} on {where}, quantization {stats['quantization']} ({stats['parameter_bytes'] / 1e6:.1f} MB "
          f"of parameters; loaded in {t_load:.1f}s)")
    for r in rows:
        print(f"  {'ok ' if r['correct'] else 'BAD'} {str(r['prompt']):<24} -> {r['answer']!s:<14}"
              f"{'' if r['correct'] else '  expected ' + str(r['expected'])}")
    print(f"{sum(r['correct'] for r in rows)}/{len(rows)} correct; {stats['generated_tokens']} tokens in "
          f"{elapsed:.1f}s including compilation ({stats['compilations']} compiled shapes); "
          f"expert load max/mean per GPU {summary['eplb_balancedness']:.2f}" if summary["eplb_balancedness"]
          else f"{sum(r['correct'] for r in rows)}/{len(rows)} correct")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
