"""jaxseek's decode step against a peer's, same shapes, same devices, same run: jax-llm-examples'
deepseek_r1_jax (a plain jitted prefill + decode loop, its own code imported from --peer) and
jaxseek's engine (LLM with the cpu8 deployment, requests added, the engine stepped), on the shapes
of issue 31 (scripts/bench_model.py: 4 layers, vocabulary 1,024, hidden 256, 32 routed experts, 4
per token, q_lora 64, kv_lora 128, 8 heads), batch 16, prompt 64, greedy, in bf16 and float32.

The peer is not part of this repository: get it with
    git clone https://github.com/jax-ml/jax-llm-examples && pass --peer jax-llm-examples/deepseek_r1_jax
(the directory holding the `deepseek_r1_jax` package; it imports etils, which jaxseek's environment has).
Its configuration: the shapes above, float weights and cache (quantize_* off, as jaxseek's float
checkpoint), XLA's ragged_dot for the experts (its Pallas decode kernel is TPU-only), its own test's mesh
layout over the 8 devices (1, 8, 1): experts and heads over them. Its decode attends over its whole
--max-seq-len cache; jaxseek's over the context bucket holding prompt + output.

    python scripts/bench_peer.py --peer /path/to/deepseek_r1_jax --json

Reported per system and dtype: ms per decode step (over --steps consecutive steps after 3 settling
steps: the peer's decode_step waited on per step, as its main.py loop reads each token; jaxseek's
Engine.step, which reads its tokens every step, one step late under async scheduling, the default;
--no-async-scheduling: each step read before the next is dispatched) and tokens/s (batch / step).
Each system runs its block alone: on a shared machine, compare runs made under the same load. jaxseek
is warmed up first (Engine.warmup on a deployment narrowed to the workload: the decode programs of
every page-table width the run reaches, as the context grows, at every EP capacity level); its
compilations while settling and while measured are reported, and must be 0.
Per decode step the EP capacity level matters: an overflow (skewed routing) raises it for a window of
steps (serving/runner.py CapacityWindow), each of which runs a larger expert bucket.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peer_stepper(peer, dtype, batch: int, prompt_len: int, max_seq_len: int):
    """The peer's model on the shapes, prefilled -> step(): one decode step, waited on."""
    import jax
    import numpy as np
    from jax.sharding import AxisType

    from bench_model import ISSUE31
    dsjax = peer
    mesh = jax.make_mesh((1, len(jax.devices()), 1), ("x", "y", "z"), axis_types=(AxisType.Auto,) * 3)
    cfg = dsjax.Config(
        num_layers=ISSUE31["num_hidden_layers"], first_k_dense=ISSUE31["first_k_dense_replace"],
        embed=ISSUE31["hidden_size"], vocab_size=ISSUE31["vocab_size"], ffw_size=ISSUE31["intermediate_size"],
        moe_ffw_size=ISSUE31["moe_intermediate_size"], n_routed_experts=ISSUE31["n_routed_experts"],
        num_experts_per_tok=ISSUE31["num_experts_per_tok"], n_group=ISSUE31["n_group"],
        topk_group=ISSUE31["topk_group"], n_shared_experts=ISSUE31["n_shared_experts"],
        q_lora_rank=ISSUE31["q_lora_rank"], kv_lora_rank=ISSUE31["kv_lora_rank"],
        num_heads=ISSUE31["num_attention_heads"], qk_nope_head_dim=ISSUE31["qk_nope_head_dim"],
        qk_rope_head_dim=ISSUE31["qk_rope_head_dim"], v_head_dim=ISSUE31["v_head_dim"], max_seq_len=max_seq_len,
        use_decode_ragged_dot_kernel=False, quantize_attn=False, quantize_moe=False, quantize_mlp=False,
        quantize_cache=False, dtype=dtype, mesh=mesh)
    weights = dsjax.Weights.init(jax.random.key(0), cfg)
    cache = dsjax.KVCache.init(jax.random.key(1), cfg, batch, cfg.max_seq_len)
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    next_tokens, _, cache = dsjax.prefill(tokens, weights, cache, cfg)
    state = {"curr": next_tokens[:, cache.iter - 1:cache.iter], "cache": cache}

    def step():  # as its main.py loop: each step's tokens read before the next
        state["curr"], state["cache"] = dsjax.decode_step(state["curr"], weights, state["cache"], cfg)
        jax.block_until_ready(state["curr"])
    return step


def jaxseek_stepper(model: Path, deployment: str, dtype, batch: int, prompt_len: int, steps: int,
                    async_scheduling: bool = True):
    """jaxseek's engine with the batch's requests added and prefilled -> (step(): one Engine.step,
    which reads its tokens; the engine, for its compilation count)."""
    import numpy as np

    from bench_engine import narrowed
    from serving import LLM, SamplingParams
    llm = LLM(model, deployment=narrowed(deployment, batch, prompt_len, steps + 8), dtype=dtype, speculative=None,
              async_scheduling=async_scheduling)
    engine = llm.engine
    engine.warmup()  # every program the run reaches (the page table widens as the context grows), no more
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(2, engine.net.config.vocab_size, prompt_len).tolist(), params)
    while any(r.in_prefill for rank in engine.scheduler.running for r in rank) or engine.scheduler.waiting:
        engine.step()
    return engine.step, engine


# while measured: steps re-run after an EP capacity overflow, and the raised levels' steps down
EP_COUNTERS = ("ep_overflow_retries", "ep_capacity_steps_down")


def measure(peer_step, jaxseek_step, engine, steps: int, settle: int = 3) -> tuple[float, float, int, int, dict]:
    """Each system's steps in one consecutive block, after `settle` steps of its own -> (peer ms,
    jaxseek ms: per step over the block, jaxseek's compilations while settling and while measured,
    its EP_COUNTERS while measured). Blocks, not one step each in turn: under async scheduling a
    jaxseek step returns with the next one in flight, which would run during the peer's step."""
    ms, compiled, counters = {}, engine.compilations, engine.runner.counters
    for name, step in (("peer", peer_step), ("jaxseek", jaxseek_step)):
        for _ in range(settle):  # compile and settle
            step()
        if name == "jaxseek":
            settling, compiled = engine.compilations - compiled, engine.compilations
            before = {k: counters[k] for k in EP_COUNTERS}
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        ms[name] = 1e3 * (time.perf_counter() - t0) / steps
    ep = {f"jaxseek_{k}": counters[k] - before[k] for k in EP_COUNTERS}
    return ms["peer"], ms["jaxseek"], settling, engine.compilations - compiled, ep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", type=Path, required=True,
                    help="jax-llm-examples' deepseek_r1_jax directory (holding the deepseek_r1_jax package)")
    ap.add_argument("--deployment", default=str(ROOT / "configs/deploy/cpu8.json"))
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/jaxseek-bench-issue31"),
                    help="where the random checkpoint of the shapes is written (once)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-seq-len", type=int, default=256, help="the peer's cache length")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                    help="jaxseek's engine loop (default: async, as it serves)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not (args.peer / "deepseek_r1_jax" / "model.py").is_file():
        raise SystemExit(f"--peer {args.peer}: no deepseek_r1_jax/model.py there (see this script's help)")
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("PJRT_NPROC", "16")
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(args.peer)]
    import jax
    import jax.numpy as jnp
    from deepseek_r1_jax import model as peer

    from bench_model import issue31_checkpoint
    model = issue31_checkpoint(args.model_dir)
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(jnp, name)
        peer_step = peer_stepper(peer, dtype, args.batch, args.prompt_len, args.max_seq_len)
        jaxseek_step, engine = jaxseek_stepper(model, args.deployment, dtype, args.batch, args.prompt_len,
                                               args.steps, args.async_scheduling)
        theirs, ours, settling, compiled, ep = measure(peer_step, jaxseek_step, engine, args.steps)
        rows.append({"dtype": name, "peer_ms_per_step": theirs, "jaxseek_ms_per_step": ours,
                     "peer_tokens_per_s": args.batch / theirs * 1e3, "jaxseek_tokens_per_s": args.batch / ours * 1e3,
                     "jaxseek_over_peer": ours / theirs, "jaxseek_compilations_while_settling": settling,
                     "jaxseek_compilations_while_measured": compiled, **ep})
        del peer_step, jaxseek_step, engine
        print(f"[bench_peer] {name}: peer {theirs:.1f} ms/step, jaxseek {ours:.1f} ms/step", file=sys.stderr, flush=True)
    result = {"device": jax.devices()[0].device_kind, "devices": len(jax.devices()), "batch": args.batch,
              "prompt_len": args.prompt_len, "steps": args.steps, "peer_max_seq_len": args.max_seq_len,
              "deployment": Path(args.deployment).name, "async_scheduling": args.async_scheduling, "results": rows}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
