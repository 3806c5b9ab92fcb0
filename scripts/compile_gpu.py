#!/usr/bin/env python3
"""Compile jaxseek's GPU programs for an H100 or H200 on a machine without a GPU (deviceless AOT), and
report what the compiled program does. Nothing runs on a GPU: speed needs one; structure does not.

    python scripts/compile_gpu.py step --phase decode|prefill [--target h200|h100] [bench_shard.py's flags]
    python scripts/compile_gpu.py kernel NAME|all [--target h100]
    python scripts/compile_gpu.py hlo FILE            # the program figures of saved HLO text
    python scripts/compile_gpu.py schedule --phase decode|prefill [--gpus 8] [...]  # scripts/gpu_schedule.py

`schedule` compiles the expert-parallel step for N GPUs and reports what overlaps each all-to-all
(scripts/gpu_schedule.py, its own flags). `step` compiles one rank's decode or prefill step of a
deployment (bench_shard.py's: the engine's own model code; --deployment FILE, default DeepSeek's
configs/deploy/deepseek-{decode-ep144,prefill-ep32}.json; --scale full = DeepSeek-V3's shapes, small =
every dimension shrunk, kept on the kernels' tiles), built for the GPU as configuration (bench_shard
--platform gpu: nothing is patched). `kernel` compiles one kernel at DeepSeek's shapes (KERNELS below).
Prints one JSON object:
    compile_s                     seconds of lowering + compiling
    weight_copies                 per layer loop (a while with a trip count): kernels per iteration that copy a
                                  slice of a loop-invariant stack (a scanned weight) that a GEMM then reads, and
                                  their bytes and kind (a weight matrix, or an FP8 weight's block scales); other
                                  parameter slices copied (a norm's weight for an XLA fusion); copies of whole
                                  parameters outside the loops
    weight_slice_copies_per_iteration   the most in one layer loop (weight_matrix_copies_per_iteration: of
                                  weight matrices)
    dequantized_bytes_per_step    float bytes written per step by fusions whose output is an FP8 weight
                                  converted (and scaled) to a float type: a dequantised copy. A GEMM fusion that
                                  reads FP8 and writes its product is not one, nor a fusion over FP8 activations
    temp_bytes                    the compiled program's temporaries
    custom_calls                  call sites by target, and by kind (mosaic, triton, cublas, cudnn, other) with
                                  launches per step (a call in a layer loop counts once per layer)
    mosaic_kernels                per Mosaic GPU kernel (ptxas, sm_90a): registers, spill stores and loads,
                                  stack frame, shared memory (dynamic scratch and static)
Runs in the GPU-compile venv (scripts/test_gpu_compile.sh makes .venv-gpu: jax 0.11.2 with the CUDA 13
plugin and nvcc); sets JAX_PLATFORMS=cpu itself. Target descriptions: configs/gpu-targets/.

The traps of compiling for a GPU from a CPU host (docs/DESIGN_NOTES.md, "Compiling for a GPU without one"),
each handled here: `lower(lowering_platforms=("cuda",))` alone builds a CPU program (the arguments carry a
GPU topology's sharding instead); Pallas kernels need `jax.set_mesh`; tokamax needs
`tokamax.config.cross_compile(True)` and the topology's device as default device; Mosaic GPU does not make
its dump folder; the CUDA plugin reads XLA_FLAGS once (the step's options are jit compiler_options); XLA does
no autotuning (GEMM tiles are defaults: structure is representative, GEMM speed is not);
`cost_analysis()` is None; a platform decided by `jax.default_backend()` at trace time would be "cpu" here
(the project decides it once, from the deployment: so no patch).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"h100": ROOT / "configs/gpu-targets/h100_sxm.txtpb", "h200": ROOT / "configs/gpu-targets/h200.txtpb"}
# One kernel at DeepSeek-V3's shapes (decode: 128 requests at KV 4,989 on EP144, 2 routed experts a rank;
# prefill: 4 x 4,096 tokens on EP32, 9 experts a rank): name -> what it is
KERNELS = {
    "flash_mla": "paged absorbed-MLA decode: 128 rows, 128 heads, KV 4,989 in 64-token pages",
    "fp8_masked": "routed experts at decode: 2 experts x 512 rows, gate/up 7168 -> 2048 and down 2048 -> 7168",
    "fp8_contiguous": "routed experts at prefill: 9 experts, 16,384 rows, gate/up and down",
    "fp8_dense": "the projections at decode (128 rows): q_a, q_b, kv_a (N 576), o_proj, dense MLP, shared expert",
    "fp8_heads": "the absorbed MLA's per-head GEMMs at decode: 128 heads x 128 rows, 128 -> 512 and 512 -> 128",
    "mla_prefill": "tokamax's flash attention at prefill: 4 x 1,024 queries over 4,096 keys, 128 heads, 192 / 128",
}
LAYOUT_OPS = {"bitcast", "convert", "copy", "reshape", "transpose", "broadcast", "multiply", "slice", "dynamic-slice",
              "get-tuple-element", "tuple"}  # what a copy of a weight (a slice, converted, scaled) is made of


# ---- the HLO text of a compiled program ---------------------------------------------------------

COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", re.M | re.S)
INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.+?) ([a-z][\w\-]*)\((.*?)\)(.*)$")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8}


def nbytes(shape: str) -> int:
    """Bytes of an HLO type (an array, or the arrays of a tuple)."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        size = 1 if dtype.startswith("f8") else BYTES.get(dtype, 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def parse(hlo: str) -> tuple[dict, str]:
    """-> ({computation: {instruction: (shape, opcode, operand names, attributes, argument text)}, with
    "ROOT": the root's name}, the entry computation's name)."""
    comps, entry = {}, None
    for m in COMPUTATION.finditer(hlo):
        body = comps[m.group(2)] = {}
        for line in m.group(3).splitlines():
            i = INSTRUCTION.match(line)
            if i is None:
                continue
            body[i.group(2)] = (i.group(3), i.group(4), re.findall(r"%([\w.\-]+)", i.group(5)), i.group(6), i.group(5))
            if i.group(1):
                body["ROOT"] = i.group(2)
        if m.group(1):
            entry = m.group(2)
    return comps, entry


def _called(attrs: str, key: str) -> list[str]:
    found = re.search(key + r"=(\{[^}]*\}|%[\w.\-]+)", attrs)
    return re.findall(r"%([\w.\-]+)", found.group(1)) if found else []


def _trips(attrs: str) -> int:
    found = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
    return int(found.group(1)) if found else 1


def _op_name(attrs: str) -> str:
    found = re.search(r'op_name="([^"]*)"', attrs)
    return found.group(1) if found else ""


NOT_A_COPY = {"dot", "convolution", "custom-call", "reduce", "reduce-window", "scatter", "sort", "while", "fusion"}


class Program:
    """A compiled program's computations, with how often each runs per step and which values are
    weights: the entry's parameters and, in a loop body, what every iteration hands on unchanged."""

    def __init__(self, hlo: str):
        self.comps, self.entry = parse(hlo)
        self.runs = {self.entry: 1}  # computation -> executions per step
        self.loops = {}  # while body -> trip count
        self.weights = {self.entry: {n for n, v in self.items(self.entry) if v[1] == "parameter"}}
        self._walk(self.entry)

    def items(self, comp):
        return ((n, v) for n, v in self.comps[comp].items() if n != "ROOT")

    def _walk(self, comp):
        for _, (shape, op, operands, attrs, _) in list(self.items(comp)):
            if op == "while":
                body, n = _called(attrs, "body")[0], _trips(attrs)
                self.loops[body] = n
                self.runs[body] = self.runs.get(body, 0) + self.runs[comp] * n
                self.weights[body] = self._invariant(body)
                self._walk(body)
                continue
            for key in ("calls", "to_apply", "branch_computations", "true_computation", "false_computation"):
                for child in _called(attrs, key):
                    if child in self.comps:
                        self.runs[child] = self.runs.get(child, 0) + self.runs[comp]
                        self._walk(child)

    def _invariant(self, body) -> set[str]:
        """The body's values that every iteration hands on unchanged (a tuple element of the loop state
        returned where it came from): a scanned weight stack, the closed-over weights."""
        comp = self.comps[body]
        root = comp[comp["ROOT"]]
        out = set()
        for index, operand in enumerate(root[2] if root[1] == "tuple" else []):
            shape, op, operands, attrs, _ = comp[operand]
            if op == "get-tuple-element" and comp[operands[0]][1] == "parameter" and f"index={index}" in attrs:
                out |= {n for n, v in self.items(body) if v[1] == "get-tuple-element" and v[2] == operands
                        and re.search(rf"\bindex={index}\b", v[3])}
        return out

    def is_weight(self, comp: str, name: str) -> bool:
        """Whether value `name` of `comp` is a weight (through bitcasts)."""
        shape, op, operands, _, _ = self.comps[comp][name]
        if op == "bitcast":
            return self.is_weight(comp, operands[0])
        return name in self.weights.get(comp, ())

    def kernels(self):
        """The kernel-level instructions (what launches) of the entry and the loop bodies: (computation,
        name, instruction, its fused computation or None)."""
        for comp in [self.entry, *self.loops]:
            for name, v in self.items(comp):
                if v[1] in ("fusion", "fusion-start", "copy", "copy-start", "slice", "dynamic-slice", "transpose",
                            "convert", "custom-call"):
                    fused = [c for c in _called(v[3], "calls") if c in self.comps]
                    yield comp, name, v, fused[0] if fused else None

    def weight_copies(self):
        """Kernels whose output is a weight or a slice of one, perhaps converted or scaled, with nothing
        computed across it -> (computation, name, output shape, FP8 converted to a float type, op_name,
        whether a GEMM reads the copy)."""
        for comp, name, (shape, op, operands, attrs, _), fused in self.kernels():
            if fused is None:
                if op != "custom-call" and operands and self.is_weight(comp, operands[0]):
                    yield comp, name, shape, False, _op_name(attrs), self.feeds_gemm(comp, name)
                continue
            body = dict(self.items(fused))
            if any(v[1] in NOT_A_COPY for v in body.values()):
                continue  # a GEMM, or anything that computes across elements: not a copy
            weights = set()
            for n, v in body.items():
                if v[1] == "parameter" and int(v[4]) < len(operands) and self.is_weight(comp, operands[int(v[4])]):
                    weights.add(n)
            if not weights or not self._only_moves(body, self.comps[fused]["ROOT"], weights):
                continue
            fp8_to_float = any(v[1] == "convert" and body[v[2][0]][0].startswith("f8")
                               and not v[0].startswith(("f8", "s", "u", "pred")) for v in body.values()
                               if v[2] and v[2][0] in body)
            out = body[self.comps[fused]["ROOT"]][0]  # (an async fusion's own shape holds its operands too)
            yield comp, name, out, fp8_to_float, _op_name(attrs), self.feeds_gemm(comp, name)

    def feeds_gemm(self, comp: str, name: str) -> bool:
        """Whether a GEMM reads value `name` of `comp` (through bitcasts and an async fusion's done): a
        dot, a fusion holding one, or a GEMM custom call (cuBLAS, a Mosaic or Triton kernel)."""
        for n, (shape, op, operands, attrs, _) in self.items(comp):
            if name not in operands:
                continue
            if op in ("bitcast", "fusion-done", "copy-done", "get-tuple-element") and self.feeds_gemm(comp, n):
                return True
            fused = [c for c in _called(attrs, "calls") if c in self.comps]
            if op in ("dot", "custom-call") or any(v[1] in ("dot", "custom-call") for c in fused
                                                     for _, v in self.items(c)):
                return True
        return False

    def _only_moves(self, body: dict, name: str, weights: set) -> bool:
        """Whether `name` is a weight parameter moved (sliced, converted, scaled by other values) without
        anything computed across its elements: a copy of (part of) the weight."""
        v = body[name]
        if name in weights:
            return True
        if v[1] == "tuple":
            return any(self._only_moves(body, o, weights) for o in v[2])
        if v[1] not in LAYOUT_OPS:
            return False
        return bool(v[2]) and self._only_moves(body, v[2][0], weights) if v[1] != "multiply" else \
            any(self._only_moves(body, o, weights) for o in v[2])


def report(hlo: str) -> dict:
    """The program figures of a compiled step's HLO text (see the module docstring)."""
    prog = Program(hlo)
    loops = {body: {"trip_count": n, "copies_per_iteration": 0, "copied_bytes_per_iteration": 0, "copies": [],
                    "other_copies_per_iteration": 0, "other_copies": []} for body, n in prog.loops.items()}
    dequantized, entry_copies, dequant_ops = 0, [], []
    for comp, name, shape, fp8_to_float, op_name, gemm in prog.weight_copies():
        if fp8_to_float:
            dequantized += nbytes(shape) * prog.runs[comp]
            dequant_ops.append(op_name or name)
        # an FP8 weight's float32 128x128 block scales, or a weight matrix (XLA hands a kernel a slice of a
        # stack in place only at 256-byte strides: docs/DESIGN_NOTES.md)
        kind = "block_scales" if shape.startswith("f32") else "matrix"
        copy = {"shape": shape.split("{")[0], "bytes": nbytes(shape), "kind": kind, "op": op_name or name}
        if comp not in loops:
            entry_copies.append({**copy, "read_by_gemm": gemm})
        elif gemm:  # the count: a GEMM on a copy of its weight's slice
            loop = loops[comp]
            loop["copies_per_iteration"] += 1
            loop["copied_bytes_per_iteration"] += copy["bytes"]
            loop["copies"].append(copy)
        else:  # a slice of a small parameter (a norm's weight) copied for an XLA fusion that cannot slice
            loops[comp]["other_copies_per_iteration"] += 1
            loops[comp]["other_copies"].append(copy)
    calls, kinds = {}, {}
    for comp in prog.comps:
        for name, (shape, op, operands, attrs, _) in prog.items(comp):
            target = re.search(r'custom_call_target="([^"]+)"', attrs) if op == "custom-call" else None
            if target is None:
                continue
            t = target.group(1)
            calls[t] = calls.get(t, 0) + 1
            kind = next((k for k in ("mosaic", "triton", "cublas", "cudnn") if k in t.lower()), "other")
            entry = kinds.setdefault(kind, {"call_sites": 0, "launches_per_step": 0})
            entry["call_sites"] += 1
            entry["launches_per_step"] += prog.runs.get(comp, 0)
    copying = [v for v in loops.values() if v["copies_per_iteration"] or v["other_copies_per_iteration"]]
    matrices = [sum(c["kind"] == "matrix" for c in v["copies"]) for v in loops.values()]
    return {"weight_slice_copies_per_iteration": max((v["copies_per_iteration"] for v in loops.values()), default=0),
            "weight_matrix_copies_per_iteration": max(matrices, default=0),
            "other_parameter_copies_per_iteration": max((v["other_copies_per_iteration"] for v in loops.values()),
                                                        default=0),
            "weight_copies": {"loops": sorted(copying, key=lambda v: -v["trip_count"]),
                              "outside_loops": entry_copies,
                              "gemm_copied_bytes_per_step": sum(v["copied_bytes_per_iteration"] * v["trip_count"]
                                                                for v in loops.values())
                              + sum(c["bytes"] for c in entry_copies if c["read_by_gemm"])},
            "dequantized_bytes_per_step": dequantized, "dequantizing_ops": sorted(set(dequant_ops)),
            "custom_calls": dict(sorted(calls.items())), "custom_call_kinds": kinds,
            "while_loops": len(prog.loops)}


# ---- Mosaic GPU kernels: ptxas's report ---------------------------------------------------------

def mosaic_kernels(dump: Path) -> list[dict]:
    """Per kernel Mosaic GPU compiled (MOSAIC_GPU_DUMP_TO with MOSAIC_GPU_DUMP_PTXAS=1): registers, spills,
    stack frame, shared memory (the dynamic scratch Mosaic allocates, and ptxas's static)."""
    out = []
    for ptxas in sorted(dump.glob("*.ptxas")):
        text = ptxas.read_text()
        number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None  # noqa: E731
        resources = ptxas.with_suffix(".resources.txt")
        scratch = re.search(r"smem_scratch_bytes=(\d+)", resources.read_text()) if resources.is_file() else None
        out.append({"kernel": ptxas.stem, "registers": number(r"Used (\d+) registers"),
                    "spill_store_bytes": number(r"(\d+) bytes spill stores"),
                    "spill_load_bytes": number(r"(\d+) bytes spill loads"),
                    "stack_frame_bytes": number(r"(\d+) bytes stack frame"),
                    "smem_bytes": (int(scratch.group(1)) if scratch else 0) + (number(r"(\d+) bytes smem") or 0)})
    return out


# ---- compiling ----------------------------------------------------------------------------------

def target(name: str, topology: str = "1x1x1"):
    """(topology, mesh) of a GPU described by configs/gpu-targets/<name>.txtpb (no GPU needed)."""
    from jax.experimental import topologies
    spec = TARGETS.get(name, Path(name))
    topo = topologies.get_topology_desc(platform="cuda", topology=topology, target_config=spec.read_text())
    n = math.prod(int(x) for x in topology.split("x"))
    return topo, topologies.make_mesh(topo, (n,), ("x",))


@contextlib.contextmanager
def cross_compiling(topo, mesh):
    """What lowering for the topology's GPU needs: the mesh in context (Pallas), and tokamax told it is
    cross-compiling with the topology's device as the default (else its Mosaic kernel refuses the CPU)."""
    import jax
    with contextlib.ExitStack() as stack:
        try:
            import tokamax
            stack.enter_context(tokamax.config.cross_compile(True))
            stack.enter_context(jax.default_device(topo.devices[0]))
        except ImportError:
            pass
        stack.enter_context(jax.set_mesh(mesh))
        yield


def compile_for(topo, mesh, fn, args) -> tuple[object, float]:
    """fn compiled for the topology's GPU from abstract arguments -> (compiled, seconds)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    replicated = NamedSharding(mesh, P())
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), args)
    start = time.time()
    with cross_compiling(topo, mesh):
        compiled = fn.lower(*args).compile()
    return compiled, time.time() - start


def step(target_name: str, argv: list[str]) -> dict:
    """One rank's decode or prefill step (bench_shard.py's, built with --platform gpu)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_shard
    topo, mesh = target(target_name)
    args = bench_shard.parse_args([*argv, "--platform", "gpu"])
    setup = bench_shard.make_setup(args, "gpu", topo.devices[0])
    fn, inputs, weights = bench_shard.build(setup, abstract=True)  # (outside the mesh: no logical-axis shardings)
    compiled, seconds = compile_for(topo, mesh, fn, list(inputs.values()))
    if args.dump_hlo:
        Path(args.dump_hlo).write_text(compiled.as_text())
    memory = compiled.memory_analysis()
    return {"device": topo.devices[0].device_kind, "what": "step", "phase": setup.phase, "scale": setup.scale,
            "deployment": args.deployment or str(bench_shard.DEPLOYMENT[setup.phase].relative_to(ROOT)),
            "quantization": setup.quantization, "kernels": bench_shard.kernels(setup),
            "compiler_options": dict(setup.compiler_options), "args": argv, "compile_s": round(seconds, 1),
            "weights_bytes": sum(weights.values()), "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
            **report(compiled.as_text())}


def kernel_cases(name: str, num_sms: int):
    """[(label, function, abstract arguments)] of one KERNELS entry at DeepSeek-V3's shapes."""
    import jax
    import jax.numpy as jnp
    from model.kernels import flash_mla, fp8_gemm, registry
    S = jax.ShapeDtypeStruct
    f8, f32, bf16 = jnp.float8_e4m3fn, jnp.float32, jnp.bfloat16

    def gemm_args(rows, n, k, groups=None):  # x [.., rows, K] fp8 + scales, w [.., N, K] fp8 + scales
        lead = () if groups is None else (groups,)
        return [S((*lead, rows, k), f8), S((*lead, rows, -(-k // 128)), f32), S((*lead, n, k), f8),
                S((*lead, -(-n // 128), -(-k // 128)), f32)]

    if name == "flash_mla":
        B, H, R, P, BS, KV = 128, 128, 512, 64, 64, 4989
        MB = -(-KV // BS)

        def decode(q, qp, pool, table, lengths):
            plan = registry.decode_plan("flash_mla", lengths, num_sms, H)
            return flash_mla.flash_mla_decode(q, qp, pool, table, lengths, 0.1, plan)
        return [("flash_mla", decode, [S((B, H, R), bf16), S((B, H, P), bf16), S((B * MB, BS, R + P), bf16),
                                       S((B, MB), jnp.int32), S((B,), jnp.int32)])]
    if name in ("fp8_masked", "fp8_contiguous"):
        groups, rows = (2, 512) if name == "fp8_masked" else (9, 16384)
        fn = fp8_gemm.fp8_masked_matmul if name == "fp8_masked" else fp8_gemm.fp8_grouped_matmul
        cases = []
        for label, n, k in (("gate_up", 2048, 7168), ("down", 7168, 2048)):
            args = gemm_args(rows, n, k, groups) if name == "fp8_masked" else \
                [gemm_args(rows, n, k)[0], gemm_args(rows, n, k)[1], *gemm_args(rows, n, k, groups)[2:]]
            cases.append((f"{name}_{label}", lambda x, xs, w, ws, c, fn=fn: fn(x, xs, w, ws, c, bf16),
                          [*args, S((groups,), jnp.int32)]))
        return cases
    if name == "fp8_dense":
        shapes = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "o_proj": (7168, 16384),
                  "mlp_gate_up": (18432, 7168), "mlp_down": (7168, 18432), "shared_gate_up": (2048, 7168),
                  "shared_down": (7168, 2048)}
        return [(f"fp8_dense_{label}", lambda x, xs, w, ws: fp8_gemm.fp8_matmul(x, xs, w, ws, bf16),
                 gemm_args(128, n, k)) for label, (n, k) in shapes.items()]
    if name == "fp8_heads":
        fn = registry.gemm("mosaic_fp8", "masked", fp8=True, n=512, k=128)
        return [(f"fp8_heads_{label}", lambda x, xs, w, ws, c: fn((x, xs), w, ws, c, bf16),
                 [*gemm_args(128, n, k, 128), S((128,), jnp.int32)]) for label, (n, k) in
                (("query", (512, 128)), ("output", (128, 512)))]
    if name == "mla_prefill":
        B, Sq, T, H = 4, 1024, 4096, 128
        attend = registry.prefill_attention("tokamax")
        return [("mla_prefill", lambda q, k, v, k_end: attend(q, k, v, k_end, 192 ** -0.5),
                 [S((B, Sq, H, 192), bf16), S((B, T, H, 192), bf16), S((B, T, H, 128), bf16), S((B, Sq), jnp.int32)])]
    raise SystemExit(f"kernel {name!r} is not one of {', '.join(KERNELS)}, all")


def kernels(target_name: str, name: str) -> dict:
    """Each case of one KERNELS entry (or all) compiled alone."""
    import jax
    topo, mesh = target(target_name)
    sms = int(getattr(topo.devices[0], "core_count", 0) or 132)
    out = []
    for entry in (KERNELS if name == "all" else [name]):
        for label, fn, args in kernel_cases(entry, sms):
            compiled, seconds = compile_for(topo, mesh, jax.jit(fn), args)
            memory = compiled.memory_analysis()
            out.append({"kernel": label, "compile_s": round(seconds, 1),
                        "temp_bytes": getattr(memory, "temp_size_in_bytes", None), **report(compiled.as_text())})
    return {"device": topo.devices[0].device_kind, "what": "kernels", "kernels": out}


def compile_gpu(what: str, target_name: str, args) -> dict:
    """`step` (args: bench_shard.py's flags) or `kernel` (args: a KERNELS name or "all") for the target,
    with each Mosaic GPU kernel's ptxas report (read from a dump folder of its own, removed after)."""
    dump = Path(tempfile.mkdtemp(prefix="mosaic-dump-"))
    os.environ.update(MOSAIC_GPU_DUMP_TO=str(dump), MOSAIC_GPU_DUMP_PTXAS="1")  # read when a kernel compiles
    try:
        result = step(target_name, list(args)) if what == "step" else kernels(target_name, args)
        return {**result, "mosaic_kernels": mosaic_kernels(dump)}
    finally:
        shutil.rmtree(dump, ignore_errors=True)
        for key in ("MOSAIC_GPU_DUMP_TO", "MOSAIC_GPU_DUMP_PTXAS"):
            os.environ.pop(key, None)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("step", "kernel", "hlo", "schedule"):
        raise SystemExit(__doc__)
    if argv[0] == "schedule":
        import gpu_schedule
        return gpu_schedule.main(argv[1:])
    if argv[0] == "hlo":
        print(json.dumps({"hlo": argv[1], **report(Path(argv[1]).read_text())}, indent=1))
        return 0
    name = "h200"
    if "--target" in argv:
        i = argv.index("--target")
        name, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    print(json.dumps(compile_gpu(argv[0], name, argv[1:] if argv[0] == "step" else argv[1]), indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # else the CUDA plugin looks for a GPU driver
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
