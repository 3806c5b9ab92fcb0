"""python -m serving.generate --model DIR [--deployment F] [--quantization fp8|none] (--prompt TEXT | --prompt-ids 1,2,3)...
[--max-tokens N --temperature T --top-k K --top-p P --seed S] [--json]
[--coordinator HOST:PORT --num-processes N --process-id I]

Multi-host: every process runs this same command and the same engine; each step is the same
deterministic decision on every process (identical inputs, no wall-clock in scheduling), so no
plan needs broadcasting; process 0 prints the results."""

from __future__ import annotations

import argparse
import json
import sys
import time

from serving import multihost
from serving.api import add_scheduling_flags, add_speculative_flags, speculative_flag


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.generate", description="Generate with the jaxseek engine.")
    ap.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--deployment", help="deployment file (default: every device present)")
    add_speculative_flags(ap)
    add_scheduling_flags(ap)
    ap.add_argument("--quantization", choices=("fp8", "none"),
                    help="weights: fp8 (FP8 GEMMs, DeepSeek's serving form) or none (default: the deployment's, "
                         "else fp8 on a GPU for an FP8 checkpoint, none otherwise)")
    ap.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    ap.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    ap.add_argument("--chat", action="store_true", help="wrap each text prompt in the model's chat template")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, help="the context length (default: the model's own)")
    ap.add_argument("--max-num-batched-tokens", type=int, help="tokens per dp rank and step (default: the "
                    "deployment's serving.max_num_batched_tokens)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt, then the stats")
    multihost.add_flags(ap)
    args = ap.parse_args(argv)
    try:
        prompt_ids = [[int(t) for t in p.split(",")] for p in args.prompt_ids]
    except ValueError:
        ap.error("--prompt-ids takes comma-separated integers, e.g. --prompt-ids 0,17,42")
    if not args.prompt and not prompt_ids:
        ap.error("give at least one --prompt or --prompt-ids")

    try:
        multihost.join(args)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    lead = jax.process_index() == 0  # every process runs the same engine steps; process 0 reports

    from serving import LLM, SamplingParams
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed)
        print("[generate] loading the model and compiling (first run takes a while)...", file=sys.stderr)
        llm = LLM(args.model, deployment=args.deployment, quantization=args.quantization, speculative=speculative_flag(args),
                  max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                  async_scheduling=args.async_scheduling)
        prompts = ([llm.chat_prompt([{"role": "user", "content": p}]) for p in args.prompt] if args.chat
                   else list(args.prompt)) + prompt_ids
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, progress=lead)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(args.prompt + args.prompt_ids, outputs):
        if not lead:
            continue
        if args.json:
            print(json.dumps({"prompt": prompt, "token_ids": out.token_ids, "text": out.text,
                              "finish_reason": out.finish_reason, "error": out.error}))
        elif out.error:
            print(f"{prompt!r} -> error: {out.error}")
        else:
            print(f"{prompt!r} -> {out.text if out.text is not None else out.token_ids!r} ({out.finish_reason})")
    stats = llm.stats()
    if not lead:
        pass
    elif args.json:
        print(json.dumps({"stats": stats, "elapsed_s": elapsed}, default=str))
    else:
        print(f"[generate] {stats['generated_tokens']} tokens in {elapsed:.2f}s "
              f"({stats['compilations']} compilations)", file=sys.stderr)
    return 1 if any(o.error for o in outputs) else 0


if __name__ == "__main__":
    sys.exit(main())
