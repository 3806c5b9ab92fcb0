"""Each GPU kernel at the shapes of issues 20 and 21, beside the XLA reference and the library alternatives.

    python scripts/bench_kernels.py [--scale full|small] [--json] [--only decode,gemm,prefill] [--sweep]
                                    [--iters N] [--budget-s S] [--commit SHA]

Cases (full scale, one GPU):
  decode_attention   absorbed MLA over 64-token pages in random order, 128 heads, 576-wide latent cache:
                     B = 1, 4, 16, 128 at KV 4,989 and B = 1, 16 at KV 32,768.
                     FLOPs 2 B H KV (576 + 512); bytes: the KV cache read once.
                     impls: flash_mla (Mosaic GPU, model/kernels/flash_mla.py; the plan is made outside the
                     timing: once per step for all 61 layers), triton (the first Pallas kernel), xla (gather +
                     einsums), tokamax_xla_contiguous (tokamax's XLA attention as MQA on pre-gathered KV).
  expert_gemm        FP8 x FP8 with 1x128 / 128x128 scales. decode, masked: 2 experts x 512 rows, 7168 -> 4096
                     (gate+up) and 2048 -> 7168 (down); prefill, contiguous: 9 experts x 14.5k rows, same widths.
                     dense (the projections): kv_a_proj 7168 -> 576 and o_proj 16384 -> 7168 at 128 decode rows,
                     the dense MLP's gate+up 7168 -> 18432 at 16,384 prefill rows.
                     FLOPs 2 rows N K; bytes: activations (FP8), weights (FP8) and output (BF16) once.
                     impls: mosaic_fp8 (model/kernels/fp8_gemm.py), xla_f32 (the reference semantics: operands
                     dequantised to float32), ragged_dot_bf16 (lax.ragged_dot / einsum on BF16 operands),
                     tokamax_ragged_dot_bf16 (tokamax's Mosaic GPU ragged dot, BF16), triton_fp8w (the first
                     Pallas grouped GEMM: FP8 weights dequantised per tile, BF16 MMA).
  prefill_attention  causal flash attention, 128 heads, qk 192 / v 128: 4 x 4,096 fresh tokens, and 4 x 4,096
                     queries continuing a 5,216-token cached prefix (56% of each prompt cached).
                     FLOPs 2 H (192 + 128) x (visible query-key pairs).
                     impls: tokamax (Mosaic GPU), tokamax_cudnn, tokamax_triton, xla (dense; skipped when its
                     scores would not fit).
--scale small runs tiny shapes on the CPU (Mosaic kernels in interpret mode: the timings mean nothing there;
the run proves the script and every implementation end to end). --sweep adds tile variants of the Mosaic
kernels. Every implementation's output is compared with the case's reference (err_rel = |out - ref| / |ref|).
--json prints JSON lines: one "meta" record (device, jax version, git commit), one "row" per (case,
implementation, config), one "summary". --budget-s stops starting new rows after that many seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9


@dataclasses.dataclass
class Case:
    name: str
    group: str
    shapes: dict
    flops: float
    bytes: float
    make: object  # () -> dict of named device arrays
    impls: dict  # name -> (fn(inputs) -> array, config dict)
    reference: str  # impl name whose output the others are compared with
    skip: dict = dataclasses.field(default_factory=dict)  # impl name -> reason


# ---- decode attention ---------------------------------------------------------------------------------

def decode_case(B, kv, scale_name, sweep):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from model.kernels.flash_mla import plan_decode
    from model.kernels.mla_decode import mla_decode
    from model.kernels.registry import decode_parts

    small = scale_name == "small"
    H, R, P, BS = (64, 128, 64, 16) if small else (128, 512, 64, 64)
    C, softmax_scale = R + P, 192 ** -0.5
    MB = -(-kv // BS)
    on_gpu = jax.default_backend() == "gpu"
    parts = decode_parts(jax.devices()[0].core_count, H) if on_gpu else 2

    def make():
        rng = np.random.default_rng(B * 7 + kv)
        k = jax.random.split(jax.random.key(B + kv), 3)
        pool = jax.random.normal(k[0], (B * MB + 64, BS, C), jnp.bfloat16)
        table = jnp.asarray(rng.permutation(B * MB + 64)[:B * MB].reshape(B, MB), jnp.int32)  # random page order
        lengths = jnp.full((B,), kv, jnp.int32)
        q_latent = jax.random.normal(k[1], (B, H, R), jnp.bfloat16)
        q_pe = jax.random.normal(k[2], (B, H, P), jnp.bfloat16)
        return dict(q_latent=q_latent, q_pe=q_pe, pool=pool, table=table, lengths=lengths)

    def paged(impl, interpret=False):
        fn = jax.jit(lambda q, p, pool, t, n: mla_decode(q, p, pool, t, n, softmax_scale, block_size=BS, impl=impl,
                                                         interpret=interpret))
        return lambda a: fn(a["q_latent"], a["q_pe"], a["pool"], a["table"], a["lengths"])

    def flash(num_parts, overhead, interpret=False):
        from model.kernels.flash_mla import flash_mla_decode
        fn = jax.jit(lambda q, p, pool, t, n, plan: flash_mla_decode(q, p, pool, t, n, softmax_scale, plan,
                                                                     interpret=interpret))
        plans = {}

        def run(a):
            key = id(a["lengths"])
            if key not in plans:  # once per step in the engine: outside the per-layer timing here
                plans[key] = jax.block_until_ready(plan_decode(a["lengths"], num_parts, row_overhead=overhead))
            return fn(a["q_latent"], a["q_pe"], a["pool"], a["table"], a["lengths"], plans[key])
        return run

    def contiguous_tokamax(a):
        from model.kernels.mla_prefill import attention
        if "kv" not in a:  # gathered once, outside the timing (the library needs contiguous keys)
            rows = a["pool"][a["table"]].reshape(B, MB * BS, C)
            a["kv"] = jax.block_until_ready(rows)
        fn = a.setdefault("_tk", jax.jit(lambda q, p, rows, n: attention(
            jnp.concatenate([q, p], -1)[:, None], rows[:, :, None], rows[:, :, None, :R],
            jnp.broadcast_to(n[:, None], (B, 1)), softmax_scale, impl="tokamax_xla")[:, 0]))
        return fn(a["q_latent"], a["q_pe"], a["kv"], a["lengths"])

    impls = {"xla": (paged("xla"), {})}
    if small:
        # (the Triton kernel's interpret-mode checks are tests/test_mla_decode.py's; here it would only add time)
        impls["flash_mla_interpret"] = (flash(parts, 2, interpret=True), {"num_parts": parts, "row_overhead": 2})
    else:
        impls["flash_mla"] = (flash(parts, 2), {"num_parts": parts, "row_overhead": 2})
        if sweep:
            for n_parts, overhead in ((parts, 1), (parts, 4), (2 * parts, 2), (max(1, parts // 2), 2)):
                impls[f"flash_mla[parts={n_parts},overhead={overhead}]"] = (
                    flash(n_parts, overhead), {"num_parts": n_parts, "row_overhead": overhead})
        impls["triton"] = (paged("pallas"), {"block_h": 16})
    skip = {}
    if importlib.util.find_spec("tokamax"):
        impls["tokamax_xla_contiguous"] = (contiguous_tokamax, {})
    else:
        skip["tokamax_xla_contiguous"] = "tokamax is not installed (pip install jaxseek[gpu])"
    shapes = dict(batch=B, kv_len=kv, heads=H, kv_lora_rank=R, rope=P, block_size=BS, pages="random order")
    return Case(f"decode_attention_B{B}_kv{kv}", "decode", shapes, flops=2.0 * B * H * kv * (C + R),
                bytes=B * kv * C * 2.0 + B * H * (C + R) * 2.0, make=make, impls=impls, reference="xla", skip=skip)


# ---- FP8 expert GEMM ----------------------------------------------------------------------------------

def gemm_case(layout, G, rows, N, K, label, scale_name, sweep):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from model.kernels.fp8_gemm import fp8_grouped_matmul, fp8_masked_matmul, fp8_matmul

    small = scale_name == "small"
    f8 = jnp.float8_e4m3fn
    masked, dense = layout == "masked", layout == "dense"
    M = G * rows if masked else rows  # rows: per group (masked) or in all (contiguous, dense: G = 1)

    def make():
        k = jax.random.split(jax.random.key(G * N + K), 4)
        x_q = (jax.random.normal(k[0], (M, K), jnp.float32) * 3).astype(f8)
        x_scale = jax.random.uniform(k[1], (M, K // 128), jnp.float32, 0.5, 2.0)
        w_q = (jax.random.normal(k[2], (G, N, K), jnp.float32) * 3).astype(f8)
        w_scale = jax.random.uniform(k[3], (G, -(-N // 128), K // 128), jnp.float32, 1e-3, 1e-2)  # N may be 4.5 x 128
        if masked:
            sizes = jnp.full((G,), rows, jnp.int32)
        else:  # balanced groups (dispatch's prefill load), the remainder on the first
            base = np.full(G, rows // G)
            base[0] += rows - base.sum()
            sizes = jnp.asarray(base, jnp.int32)
        return dict(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, sizes=sizes)

    def shaped(a, out):  # masked outputs are [G, Mmax, N]; compare everything as [M, N]
        return out.reshape(M, N)

    def mosaic(block_m, stages, interpret=False):
        if dense:
            fn = jax.jit(lambda x, s, w, ws: fp8_matmul(x, s, w[0], ws[0], jnp.bfloat16, block_m=block_m,
                                                        stages=stages, interpret=interpret))
            return lambda a: fn(a["x_q"], a["x_scale"], a["w_q"], a["w_scale"])
        if masked:
            fn = jax.jit(lambda x, s, w, ws, c: fp8_masked_matmul(
                x.reshape(G, rows, K), s.reshape(G, rows, -1), w, ws, c, jnp.bfloat16, block_m=block_m, stages=stages,
                interpret=interpret))
        else:
            fn = jax.jit(lambda x, s, w, ws, c: fp8_grouped_matmul(x, s, w, ws, c, jnp.bfloat16, block_m=block_m,
                                                                   stages=stages, interpret=interpret))
        return lambda a: shaped(a, fn(a["x_q"], a["x_scale"], a["w_q"], a["w_scale"], a["sizes"]))

    def dequantised(a, dtype):
        key = f"_deq_{jnp.dtype(dtype).name}"
        if key not in a:  # outside the timing: what an XLA path holds when it computes in `dtype`
            x = a["x_q"].astype(jnp.float32) * jnp.repeat(a["x_scale"], 128, axis=1)
            w = a["w_q"].astype(jnp.float32) * jnp.repeat(jnp.repeat(a["w_scale"], 128, 1)[:, :N], 128, 2)
            a[key] = jax.block_until_ready((x.astype(dtype), jnp.swapaxes(w, 1, 2).astype(dtype)))  # w [G, K, N]
        return a[key]

    def xla(dtype):
        precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
        if dense:
            fn = jax.jit(lambda x, w: jnp.einsum("mk,kn->mn", x, w[0], precision=precision,
                                                 preferred_element_type=jnp.float32).astype(jnp.bfloat16))
            return lambda a: fn(*dequantised(a, dtype))
        if masked:
            fn = jax.jit(lambda x, w: jnp.einsum("gmk,gkn->gmn", x.reshape(G, rows, K), w, precision=precision,
                                                 preferred_element_type=jnp.float32).astype(jnp.bfloat16))
            return lambda a: shaped(a, fn(*dequantised(a, dtype)))
        fn = jax.jit(lambda x, w, s: jax.lax.ragged_dot(x, w, s, precision=precision,
                                                        preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        return lambda a: fn(*dequantised(a, dtype), a["sizes"])

    def tokamax_ragged(a):
        import tokamax
        x, w = dequantised(a, jnp.bfloat16)
        fn = a.setdefault("_tk", jax.jit(lambda x, w, s: tokamax.ragged_dot(x, w, s, implementation="mosaic")))
        return fn(x, w, a["sizes"] if not masked else jnp.full((G,), rows, jnp.int32))

    def triton(interpret=False):
        from model.kernels.grouped_gemm import grouped_matmul
        fn = jax.jit(lambda x, w, ws, s: grouped_matmul(x, w, s, ws, impl="pallas", interpret=interpret))

        def run(a):
            if "_tr" not in a:  # the first kernel's layout: x BF16, w FP8 [G, K, N] with [G, K/128, N/128] scales
                a["_tr"] = (dequantised(a, jnp.bfloat16)[0], jnp.swapaxes(a["w_q"], 1, 2), jnp.swapaxes(a["w_scale"], 1, 2))
            x, w, ws = a["_tr"]
            return fn(x, w, ws, a["sizes"] if not masked else jnp.full((G,), rows, jnp.int32))
        return run

    impls = {"xla_f32": (xla(jnp.float32), {"operands": "float32"})}
    if small:
        impls["mosaic_fp8_interpret"] = (mosaic(64, 2, interpret=True), {"block_m": 64, "stages": 2})
        impls["ragged_dot_bf16"] = (xla(jnp.bfloat16), {})
    else:
        impls["mosaic_fp8"] = (mosaic(128, 4), {"block_m": 128, "stages": 4})
        if sweep:
            for bm, st in ((128, 3), (128, 5), (64, 4), (64, 6)):
                impls[f"mosaic_fp8[block_m={bm},stages={st}]"] = (mosaic(bm, st), {"block_m": bm, "stages": st})
        impls["ragged_dot_bf16"] = (xla(jnp.bfloat16), {})
        if not dense:
            impls["triton_fp8w"] = (triton(), {})
    skip = {}
    if not small and not dense:
        if importlib.util.find_spec("tokamax"):
            impls["tokamax_ragged_dot_bf16"] = (tokamax_ragged, {})
        else:
            skip["tokamax_ragged_dot_bf16"] = "tokamax is not installed (pip install jaxseek[gpu])"
    shapes = dict(layout=layout, groups=G, rows=M, rows_per_group=rows if masked else rows / G, n=N, k=K,
                  weights="fp8 e4m3 [G, N, K] + 128x128 f32 scales", activations="fp8 e4m3 + 1x128 f32 scales")
    return Case(f"{'dense' if dense else 'expert'}_gemm_{layout}_{label}", "gemm", shapes, flops=2.0 * M * N * K,
                bytes=M * K + G * N * K + M * N * 2.0 + M * K / 32 + G * N * K / 4096, make=make, impls=impls,
                reference="xla_f32", skip=skip)


# ---- prefill attention --------------------------------------------------------------------------------

def prefill_case(B, S, prefix, scale_name):
    import jax
    import jax.numpy as jnp

    from model.kernels.mla_prefill import attention

    small = scale_name == "small"
    H, D, V = (4, 48, 32) if small else (128, 192, 128)
    T = prefix + S
    pairs = B * sum(prefix + s + 1 for s in range(S))

    def make():
        k = jax.random.split(jax.random.key(S + prefix), 3)
        return dict(q=jax.random.normal(k[0], (B, S, H, D), jnp.bfloat16),
                    k=jax.random.normal(k[1], (B, T, H, D), jnp.bfloat16),
                    v=jax.random.normal(k[2], (B, T, H, V), jnp.bfloat16),
                    k_end=jnp.broadcast_to(prefix + jnp.arange(S, dtype=jnp.int32)[None] + 1, (B, S)))

    def impl(name):
        fn = jax.jit(functools.partial(attention, scale=D ** -0.5, impl=name))
        return lambda a: fn(a["q"], a["k"], a["v"], a["k_end"])

    skip, impls = {}, {}
    names = ("xla", "tokamax_xla") if small else ("tokamax", "tokamax_cudnn", "tokamax_triton", "xla")
    for name in names:
        if name.startswith("tokamax") and not importlib.util.find_spec("tokamax"):
            skip[name] = "tokamax is not installed (pip install jaxseek[gpu])"
        elif name == "xla" and B * H * S * T * 4 * 2 > 16 * GB:
            skip[name] = f"dense scores and probabilities would take {B * H * S * T * 8 / GB:.0f} GB"
        else:
            impls[name] = (impl(name), {})
    reference = "xla" if "xla" in impls else next(iter(impls))
    shapes = dict(batch=B, queries=S, cached_prefix=prefix, keys=T, heads=H, qk_head_dim=D, v_head_dim=V,
                  mask="query at position p sees keys 0..p")
    return Case(f"prefill_attention_{B}x{S}_prefix{prefix}", "prefill", shapes, flops=2.0 * H * (D + V) * pairs,
                bytes=2.0 * (B * S * H * (D + V) + B * T * H * (D + V)), make=make, impls=impls, reference=reference,
                skip=skip)


def cases(scale: str, only: set, sweep: bool) -> list:
    """The cases in the order a time-limited GPU session needs them: the issues' headline shapes first."""
    small = scale == "small"
    out = []
    if "decode" in only:
        out.append(decode_case(2, 200, scale, sweep) if small else decode_case(128, 4989, scale, sweep))
    if "gemm" in only:
        if small:
            out += [gemm_case("masked", 2, 64, 128, 256, "small", scale, sweep),
                    gemm_case("contiguous", 3, 128, 128, 256, "small", scale, sweep),
                    gemm_case("dense", 1, 70, 192, 512, "small", scale, sweep)]
        else:
            out += [gemm_case("masked", 2, 512, 4096, 7168, "gate_up", scale, sweep),
                    gemm_case("masked", 2, 512, 7168, 2048, "down", scale, sweep),
                    gemm_case("contiguous", 9, 131072, 4096, 7168, "gate_up", scale, sweep),
                    gemm_case("contiguous", 9, 131072, 7168, 2048, "down", scale, sweep),
                    gemm_case("dense", 1, 128, 576, 7168, "kv_a_decode", scale, sweep),
                    gemm_case("dense", 1, 128, 7168, 16384, "o_proj_decode", scale, sweep),
                    gemm_case("dense", 1, 16384, 18432, 7168, "mlp_gate_up_prefill", scale, sweep)]
    if "prefill" in only:
        shapes = [(2, 64, 80)] if small else [(4, 4096, 0), (4, 4096, 5216)]
        out += [prefill_case(B, S, prefix, scale) for B, S, prefix in shapes]
    if "decode" in only and not small:  # correct and not slower than XLA at B = 1..16 and at KV 32K
        out += [decode_case(B, kv, scale, sweep) for B, kv in ((16, 4989), (4, 4989), (1, 4989), (16, 32768),
                                                               (1, 32768))]
    return out


# ---- running ------------------------------------------------------------------------------------------

def time_fn(fn, inputs, iters: int, meaningful: bool):
    """Median seconds per call over `iters` samples after a warm-up call (which compiles); each sample runs
    enough back-to-back calls to last ~20 ms, then waits for the device. Where timings mean nothing (the CPU,
    kernels interpreted) the warm-up call is the only one. Returns (median, samples, output, first call s)."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(inputs))
    first = time.perf_counter() - start  # compile + one call
    if not meaningful:
        return first, [first], out, first
    start = time.perf_counter()
    jax.block_until_ready(fn(inputs))
    once = time.perf_counter() - start
    reps = max(1, min(50, int(0.02 / max(once, 1e-6))))
    samples = [once] if reps == 1 else []  # a slow call is a sample by itself
    while len(samples) < iters:
        start = time.perf_counter()
        for _ in range(reps):
            result = fn(inputs)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples), samples, out, first


def compare(out, ref) -> dict:
    """|out - ref| / |ref| (Frobenius), the largest difference and finiteness, computed on the device in f32."""
    import jax.numpy as jnp

    if out.shape != ref.shape:
        return {"err_rel": None, "err_max": None, "finite": bool(jnp.isfinite(out).all()),
                "note": f"shape {out.shape} != reference {ref.shape}"}
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    diff = out - ref
    return {"err_rel": float(jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)),
            "err_max": float(jnp.abs(diff).max()), "finite": bool(jnp.isfinite(out).all())}


def git_commit(override: str | None) -> str | None:
    if override:
        return override
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def meta(args) -> dict:
    import jax
    import jaxlib

    device = jax.devices()[0]
    tokamax = importlib.util.find_spec("tokamax")
    return {"kind": "meta", "script": "bench_kernels", "device": device.device_kind, "platform": device.platform,
            "device_count": jax.device_count(), "cores": getattr(device, "core_count", None),
            "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
            "tokamax_version": __import__("tokamax").__version__ if tokamax else None,
            "git_commit": git_commit(args.commit), "scale": args.scale, "sweep": args.sweep, "iters": args.iters,
            "argv": sys.argv[1:], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "timing_meaningful": device.platform == "gpu"}


def run_case(case: Case, names: list, iters: int, deadline: float, emit, meaningful: bool) -> None:
    """Times case.impls[name] for each name (the reference first, always computed: errors are against it)."""
    import jax

    if time.monotonic() > deadline:
        for name in names:
            emit({"kind": "row", "case": case.name, "group": case.group, "impl": name, "shapes": case.shapes,
                  "status": "skipped", "reason": "time budget (--budget-s) spent"})
        return
    inputs = case.make()
    ref_out = None
    for name in [case.reference] + [n for n in names if n != case.reference]:
        fn, config = case.impls[name]
        row = {"kind": "row", "case": case.name, "group": case.group, "impl": name, "config": config,
               "shapes": case.shapes, "flops": case.flops, "bytes": case.bytes}
        if name == case.reference and name not in names:  # needed for the errors only
            try:
                ref_out = jax.block_until_ready(fn(inputs))
            except Exception:
                pass
            continue
        if time.monotonic() > deadline:
            emit({**row, "status": "skipped", "reason": "time budget (--budget-s) spent"})
            continue
        try:
            seconds, samples, out, first = time_fn(fn, inputs, iters, meaningful)
        except Exception as e:  # one failing implementation must not hide the others' figures
            emit({**row, "status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            continue
        if name == case.reference:
            ref_out = out
        row.update(status="ok", ms=seconds * 1e3, ms_all=[s * 1e3 for s in samples], first_call_s=first,
                   tflops=case.flops / seconds / 1e12, tbps=case.bytes / seconds / 1e12)
        if ref_out is not None:
            row.update(reference=case.reference, **compare(out, ref_out))
        emit(row)
        del out
    del inputs, ref_out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("full", "small"), default=None, help="default: full on a GPU, else small")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ap.add_argument("--only", default="decode,gemm,prefill", help="comma-separated groups: decode, gemm, prefill")
    ap.add_argument("--sweep", action="store_true", help="add tile variants of the Mosaic GPU kernels")
    ap.add_argument("--iters", type=int, default=None, help="timed samples per row (full: 10, small: 1)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    ap.add_argument("--commit", help="git commit to record (a copy of the repo without .git)")
    ap.add_argument("--force", action="store_true", help="run --scale full on a CPU anyway")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= {"decode", "gemm", "prefill"}:
        ap.error(f"--only takes decode, gemm, prefill; got {sorted(only - {'decode', 'gemm', 'prefill'})}")
    args.only = only
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    import jax

    platform = jax.devices()[0].platform
    args.scale = args.scale or ("full" if platform == "gpu" else "small")
    if args.scale == "full" and platform != "gpu" and not args.force:
        print("--scale full allocates tens of GB and runs the GPU kernels compiled: use a GPU, or --scale small "
              "here (pass --force to try anyway).", file=sys.stderr)
        return 2
    args.iters = args.iters or (10 if args.scale == "full" else 1)
    start = time.monotonic()
    deadline = start + (args.budget_s if args.budget_s is not None else float("inf"))
    rows = []

    def emit(record):
        rows.append(record)
        if args.json:
            print(json.dumps(record), flush=True)
        elif record["kind"] == "row":
            if record["status"] == "ok":
                err = "" if record.get("err_rel") is None else f"  err {record['err_rel']:.1e}"
                print(f"{record['case']:<44} {record['impl']:<44} {record['ms']:9.3f} ms {record['tflops']:7.1f} "
                      f"TFLOP/s {record['tbps']:6.2f} TB/s{err}", flush=True)
            else:
                print(f"{record['case']:<44} {record['impl']:<44} {record['status']}: {record['reason']}", flush=True)

    head = meta(args)
    if args.json:
        print(json.dumps(head), flush=True)
    else:
        print(f"device {head['device']} ({head['platform']}), jax {head['jax_version']}, commit {head['git_commit']}, "
              f"scale {args.scale}{'' if head['timing_meaningful'] else ' (interpret mode: timings mean nothing)'}")
    all_cases = cases(args.scale, args.only, args.sweep)
    for case in all_cases:  # first every case's main implementations, then the tile variants
        names = [n for n in case.impls if "[" not in n]
        run_case(case, names, args.iters, deadline, emit, head["timing_meaningful"])
        for name, reason in case.skip.items():
            emit({"kind": "row", "case": case.name, "group": case.group, "impl": name, "shapes": case.shapes,
                  "status": "skipped", "reason": reason})
    for case in all_cases:
        variants = [n for n in case.impls if "[" in n]
        if variants:
            run_case(case, variants, args.iters, deadline, emit, head["timing_meaningful"])
    done = [r for r in rows if r["kind"] == "row"]
    summary = {"kind": "summary", "rows": len(done), "ok": sum(r["status"] == "ok" for r in done),
               "errors": sum(r["status"] == "error" for r in done),
               "skipped": sum(r["status"] == "skipped" for r in done), "elapsed_s": time.monotonic() - start}
    emit(summary)
    if not args.json:
        print(f"{summary['ok']} ok, {summary['errors']} errors, {summary['skipped']} skipped in "
              f"{summary['elapsed_s']:.0f} s")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
