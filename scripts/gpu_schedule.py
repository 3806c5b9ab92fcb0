"""The expert-parallel step compiled for N GPUs on a machine without one, and what its schedule
overlaps: per async collective its payload bytes, whether it is synchronous, and the kernels XLA
placed between its start and done, by micro-batch and stage (the named scopes of model/overlap.py).

    JAX_PLATFORMS=cpu python scripts/gpu_schedule.py --phase prefill [--scale full|small] [--gpus 8]
        [--target h200|h100] [--overlap auto|none|two_batch|five_stage] [--option name=value ...] [--json]

The step is one engine step's forward (DeepseekV3.forward_step over the paged KV cache, then the
logits of each row's last position) of a DeepSeek-V3 with 1 dense + 2 MoE layers (full: the real
shapes; small: bench_shard's small_config) on a dp = N mesh of deviceless GPUs (EP over all of
them, 32 redundant experts at full scale as DeepSeek's), FP8 weights and dispatch, BF16
combine, the GPU kernels and the ragged all-to-all. It is compiled with the deployment's GPU compiler
options (sharding/deployment.py: Deployment.xla_options("gpu"); --option adds to them).

The figure of merit (docs/ARCHITECTURE.md, "The schedule as compiled"): the share of the expert
all-to-all bytes (dispatch and combine of both micro-batches, weighted by loop trip counts) whose
start..done interval holds a GEMM or attention kernel of the *other* micro-batch.

Also printed: every other collective of the step (bytes per step, sync or async, where from). Needs
the GPU-compile environment (.venv-gpu: scripts/test_gpu_compile.sh makes it) and JAX_PLATFORMS=cpu.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# Per-rank shapes of one step. decode: DeepSeek's 128 requests per GPU at KV 4,989 (64-token pages);
# prefill: 4 rows of 1,024 tokens per GPU (the engine's long-prompt chunk), fresh prompts.
SHAPES = {"full": {"decode": dict(rows=128, seq=1, kv_len=4989, block=64), "prefill": dict(rows=4, seq=1024, block=64)},
          "small": {"decode": dict(rows=8, seq=1, kv_len=256, block=16), "prefill": dict(rows=4, seq=64, block=16)}}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter",
               "collective-permute", "collective-broadcast")
EXPERT_STAGES = ("plan", "dispatch", "combine")  # plan: the ragged transport's counts (R int32)


# ---- reading a scheduled HLO module -----------------------------------------------------------------

@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    shape: str  # the result shape text
    operands: list[str]
    op_name: str  # jax's name stack ("" when XLA dropped it)
    line: str

    @property
    def calls(self) -> list[str]:
        return re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)", self.line)


_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([\w\-$]+)\((.*)$")


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """-> ({computation: its instructions in schedule order}, entry computation's name)."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        m = re.match(r"^(ENTRY )?%(\S+) \(.*\) -> .* \{$", line)
        if m:
            current = comps.setdefault(m.group(2), [])
            entry = m.group(2) if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line) if current is not None else None
        if m:
            args = m.group(4)
            operands = re.findall(r"%([\w.\-]+)", args.split("), ")[0] if "), " in args else args)
            op = re.search(r'op_name="([^"]*)"', line)
            current.append(Instr(m.group(1), m.group(3), m.group(2), operands, op.group(1) if op else "", line))
    return comps, entry


def shape_bytes(shape: str) -> int:
    return sum(DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape) if dt in DTYPE_BYTES)


def multiplicities(comps: dict[str, list[Instr]], entry: str) -> dict[str, int]:
    """How many times each computation runs per step: while bodies by their known trip counts."""
    mult = {entry: 1}
    todo = [entry]
    while todo:
        comp = todo.pop()
        for ins in comps.get(comp, []):
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.line)
            for callee in ins.calls:
                if callee in comps and callee not in mult:
                    mult[callee] = mult[comp] * (int(trips.group(1)) if trips and ins.opcode == "while" else 1)
                    todo.append(callee)
    return mult


def scope(op_name: str) -> tuple[int | None, str | None]:
    """(micro-batch, stage) from a name stack holding model/overlap.py's `mb{i}/{stage}` scopes
    (the plain layer's stages: micro-batch None)."""
    m = re.findall(r"mb(\d)/(\w+)", op_name)
    if m:
        return int(m[-1][0]), m[-1][1]
    m = re.findall(r"/(attention|gate|dispatch|experts|combine|mlp|shared)/", op_name + "/")
    return None, (m[-1] if m else None)


def is_heavy(ins: Instr, comps: dict[str, list[Instr]]) -> bool:
    """A GEMM (XLA dot / cuBLAS / Triton GEMM fusion / Pallas or Mosaic kernel) or an attention kernel."""
    if ins.opcode in ("dot", "convolution"):
        return True
    if ins.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', ins.line)
        return bool(target and re.match(r"(__cublas|__cudnn|mosaic|__gpu\$xla\.gpu\.triton|triton)", target.group(1)))
    if ins.opcode == "fusion":
        if re.search(r'"kind":"__(triton_gemm|triton_nested_gemm_fusion|cublas|cudnn|custom_fusion)', ins.line):
            return True
        return any(i.opcode in ("dot", "convolution") for c in ins.calls for i in comps.get(c, []))
    return False


def _through_tuples(ins: Instr, by_name: dict[str, Instr]) -> Instr | None:
    """What a get-tuple-element reads, through barriers and tuples (None: a parameter or a call's result)."""
    path, src = [], ins
    while src is not None:
        if src.opcode == "get-tuple-element":
            path.insert(0, int(re.search(r"index=(\d+)", src.line).group(1)))
            src = by_name.get(src.operands[0])
        elif src.opcode == "opt-barrier":
            src = by_name.get(src.operands[0])
        elif src.opcode == "tuple" and path and path[0] < len(src.operands):
            src = by_name.get(src.operands[path.pop(0)])
        else:
            return src if not path else None
    return None


def _origin(ins: Instr, by_name: dict[str, Instr], depth: int = 6) -> str:
    """The name stack of what an instruction belongs to (XLA drops it on some collectives): its own
    when it names a micro-batch, else the nearest operand's that does (breadth first, through tuples
    and barriers), so a collective takes its own stage's name (its offsets, its output buffer) before
    the name of what produced the rows it moves."""
    frontier, seen = [ins], set()
    for _ in range(depth):
        for node in frontier:
            if re.search(r"mb\d/", node.op_name):
                return node.op_name
        nxt = []
        for node in frontier:
            for o in node.operands:
                src = by_name.get(o)
                if src is not None and src.opcode == "get-tuple-element":
                    src = _through_tuples(src, by_name)
                if src is not None and src.name not in seen and src.opcode != "parameter":
                    seen.add(src.name)
                    nxt.append(src)
        frontier = nxt
    return ins.op_name


def collectives(text: str) -> list[dict]:
    """Every collective of the compiled step: kind, payload bytes per run, runs per step, sync or
    async, its micro-batch and stage, and the kernels scheduled between its start and done."""
    comps, entry = parse_module(text)
    mult = multiplicities(comps, entry)
    out = []
    for comp, instrs in comps.items():
        if comp not in mult:
            continue
        by_name = {i.name: i for i in instrs}
        for pos, ins in enumerate(instrs):
            base = ins.opcode.removesuffix("-start")
            called = [i for c in ins.calls for i in comps.get(c, [])] if ins.opcode == "fusion-start" else []
            inner = next((i for i in called if i.opcode in COLLECTIVES), None)
            if inner is not None:  # an async fusion wrapping a collective (e.g. Triton all-reduce)
                base = inner.opcode
            if base not in COLLECTIVES:
                continue
            is_async = ins.opcode.endswith("-start")
            sync_flag = re.search(r'"is_sync":(true|false)', ins.line)
            op_name = _origin(ins, by_name) or (inner.op_name if inner is not None else "")
            mb, stage = scope(op_name)
            if base == "ragged-all-to-all" and stage == "plan":  # XLA drops its name: the rows it moves are the plan's
                stage = "dispatch"
            item = {"kind": base, "name": ins.name, "computation": comp, "runs": mult[comp],
                    "async": is_async and not (sync_flag and sync_flag.group(1) == "true"),
                    "micro_batch": mb, "stage": stage, "op_name": op_name}
            if is_async:
                done = next((j for j in range(pos + 1, len(instrs)) if ins.name in instrs[j].operands
                             and instrs[j].opcode.endswith("-done")), None)
                end = done if done is not None else pos
                item["bytes"] = shape_bytes(instrs[end].shape) if done is not None else shape_bytes(ins.shape)
                kernels = {}
                for k in instrs[pos + 1:end]:
                    if k.opcode in ("fusion", "custom-call", "dot", "convolution", "while", "call", "conditional"):
                        kmb, kstage = scope(k.op_name)
                        key = f"mb{kmb}/{kstage}" if kmb is not None else (kstage or "other")
                        entry_ = kernels.setdefault(key, {"kernels": 0, "heavy": 0})
                        entry_["kernels"] += 1
                        entry_["heavy"] += is_heavy(k, comps) or k.opcode == "while"
                item["between"] = kernels
            else:
                item["bytes"] = shape_bytes(ins.shape)
            out.append(item)
    return out


def overlap_share(colls: list[dict]) -> dict:
    """Share of the expert all-to-all bytes (dispatch + combine of both micro-batches) with a GEMM or
    attention kernel of the other micro-batch between start and done."""
    expert = [c for c in colls if "all-to-all" in c["kind"] and c["stage"] in EXPERT_STAGES]
    total = sum(c["bytes"] * c["runs"] for c in expert)

    def other_heavy(c):
        if c["micro_batch"] is None or not c["async"]:
            return False
        return any(v["heavy"] for k, v in c.get("between", {}).items() if k.startswith("mb")
                   and int(k[2]) != c["micro_batch"])
    hidden = sum(c["bytes"] * c["runs"] for c in expert if other_heavy(c))
    others = {}
    for c in colls:
        if c in expert:
            continue
        where = f"mb{c['micro_batch']}/{c['stage']}" if c["micro_batch"] is not None else (c["stage"] or c["op_name"])
        key = (c["kind"], "async" if c["async"] else "sync", where)
        others[key] = others.get(key, 0) + c["bytes"] * c["runs"]
    return {"expert_all_to_all_bytes": total, "overlapped_bytes": hidden,
            "overlapped_share": round(hidden / total, 4) if total else None,
            "expert_all_to_alls": sum(c["runs"] for c in expert),
            "sync_collectives": sum(c["runs"] for c in colls if not c["async"]),
            "other_collectives": [{"kind": k, "mode": m, "from": f, "bytes_per_step": b}
                                  for (k, m, f), b in sorted(others.items(), key=lambda kv: -kv[1])]}


# ---- the step, compiled for deviceless GPUs --------------------------------------------------------

def gpu_mesh(target_name: str, gpus: int):
    """(topology, dp x tp = gpus x 1 mesh) of N deviceless GPUs on one host (topology "1x1xN")."""
    from compile_gpu import target
    from jax.experimental import topologies
    topo, _ = target(target_name, f"1x1x{gpus}")
    return topo, topologies.make_mesh(topo, (gpus, 1), ("dp", "tp"))


def model_config(scale: str):
    from model import ModelConfig
    cfg = ModelConfig.from_json(ROOT / "configs" / "deepseek-v3-671b" / "config.json")
    cfg = cfg.replace(num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=0)
    if scale == "small":
        from bench_shard import small_config
        cfg = small_config(cfg).replace(num_hidden_layers=3, first_k_dense_replace=1)
    return cfg


def compile_step(phase: str, scale: str, gpus: int, target: str, overlap: str, deployment=None,
                 options: dict | None = None, extra_options: dict | None = None):
    """-> (compiled executable, what was compiled). options: the compiler options (default: the
    deployment's for this mesh); extra_options: set on top of them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from model import DeepseekV3
    from serving.kv_cache import PagedCache
    from sharding.deployment import Deployment
    from sharding.mesh import param_shardings

    from compile_gpu import cross_compiling
    from model.kernels import registry

    topo, mesh = gpu_mesh(target, gpus)
    cfg = model_config(scale)
    dep = deployment or Deployment(name=f"ep{gpus}", dp=gpus, redundant_experts=(-cfg.n_routed_experts) % gpus
                                   + (32 if scale == "full" and (cfg.n_routed_experts + 32) % gpus == 0 else 0),
                                   quantization="fp8", dispatch_dtype="fp8", combine_dtype="bf16")
    dep = dataclasses.replace(dep, overlap=overlap)
    n_physical = dep.n_physical_experts(cfg.n_routed_experts)
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: DeepseekV3(cfg, jnp.bfloat16, nnx.Rngs(0), n_physical, "fp8")))
    shardings = param_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    kernels = registry.resolve(dep.kernels, "gpu", topo.devices[0])
    ep = dep.ep_config(mesh, kernels)
    compiler_options = {**(dep.xla_options("gpu") if options is None else options), **(extra_options or {})}

    sh = SHAPES[scale][phase]
    rows, S, block = sh["rows"] * gpus, sh["seq"], sh["block"]
    context = sh.get("kv_len", S)
    pages = -(-context // block)
    C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    by_rank = NamedSharding(mesh, P("dp"))
    args = dict(
        pool=jax.ShapeDtypeStruct((cfg.num_hidden_layers, sh["rows"] * pages * gpus, block, C), jnp.bfloat16,
                                  sharding=NamedSharding(mesh, P(None, "dp"))),
        page_table=jax.ShapeDtypeStruct((rows, pages), jnp.int32, sharding=by_rank),
        tokens=jax.ShapeDtypeStruct((rows, S), jnp.int32, sharding=by_rank),
        positions=jax.ShapeDtypeStruct((rows, S), jnp.int32, sharding=by_rank))
    absorbed = phase == "decode"

    def step(state, pool, page_table, tokens, positions):
        net = nnx.merge(graphdef, state)
        net.set_kernels(kernels)
        net.set_expert_parallel(ep)
        logits, cache, stats = net.forward_step(tokens, positions, PagedCache(pool, page_table, mesh), absorbed,
                                                head=lambda hidden, rows: net.logits(hidden[:, -1]))
        return logits, cache.pool, stats["overflow"]

    t0 = time.time()
    with cross_compiling(topo, mesh):
        lowered = jax.jit(step, donate_argnums=(1,)).lower(state, *args.values())
        compiled = lowered.compile(compiler_options)
    return compiled, {"phase": phase, "scale": scale, "gpus": gpus, "device": topo.devices[0].device_kind,
                      "overlap": dep.overlap, "dispatch": ep.dispatch_dtype, "combine": ep.combine_dtype,
                      "transport": ep.transport, "experts_per_gpu": n_physical // gpus, "rows_per_gpu": sh["rows"],
                      "seq": S, "kv_len": context, "compiler_options": compiler_options,
                      "compile_s": round(time.time() - t0, 1)}


def report(compiled, meta: dict, detail: bool = True) -> dict:
    colls = collectives(compiled.as_text())
    out = {**meta, **overlap_share(colls)}
    if detail:
        out["collectives"] = [{k: v for k, v in c.items() if k not in ("name", "computation")} for c in colls]
    return out


def parse_option(text: str):
    name, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return name, cast(value)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(value.lower(), value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("decode", "prefill"), required=True)
    ap.add_argument("--scale", choices=("full", "small"), default="full")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--target", default="h200", help="h200 | h100 | a target description file")
    ap.add_argument("--overlap", default="auto", choices=("auto", "none", "two_batch", "five_stage"))
    ap.add_argument("--deployment", help="a deployment file (default: EP over the GPUs, FP8 dispatch, BF16 combine)")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="a compiler option on top of the deployment's (repeatable)")
    ap.add_argument("--no-options", action="store_true", help="compile with XLA's defaults (no deployment options)")
    ap.add_argument("--hlo", help="also write the compiled HLO text here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from sharding.deployment import Deployment
    dep = Deployment.from_json(args.deployment) if args.deployment else None
    compiled, meta = compile_step(args.phase, args.scale, args.gpus, args.target, args.overlap, dep,
                                  {} if args.no_options else None, dict(parse_option(o) for o in args.option))
    if args.hlo:
        Path(args.hlo).write_text(compiled.as_text())
    out = report(compiled, meta, detail=args.json)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['phase']} {out['scale']} on {out['gpus']} x {out['device']} (overlap {out['overlap']}), "
          f"compiled in {out['compile_s']} s: {out['overlapped_share']} of {out['expert_all_to_all_bytes']:,} "
          f"expert all-to-all bytes under the other micro-batch's GEMMs or attention; "
          f"{out['sync_collectives']} synchronous collectives")
    for c in out["other_collectives"]:
        print(f"  other: {c['kind']} {c['mode']} from {c['from']}: {c['bytes_per_step']:,} bytes per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
