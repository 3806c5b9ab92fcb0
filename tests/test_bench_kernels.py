"""scripts/bench_kernels.py end to end at --scale small on the CPU (the Mosaic GPU kernels in interpret mode,
tokamax's XLA path), and its full-scale cases (the issues' shapes and FLOP counts) without allocating them."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_kernels.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_run():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, str(SCRIPT), "--scale", "small", "--json", "--commit", "abc123"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines()]


def test_small_run_measures_every_kernel_against_its_reference(small_run):
    head, rows, summary = small_run[0], small_run[1:-1], small_run[-1]
    assert head["kind"] == "meta" and head["platform"] == "cpu" and head["jax_version"] == "0.11.2"
    assert head["git_commit"] == "abc123" and head["timing_meaningful"] is False
    assert summary == {**summary, "kind": "summary", "rows": len(rows), "errors": 0, "skipped": 0}
    impls = {(r["group"], r["impl"]) for r in rows}
    assert {("decode", "flash_mla_interpret"), ("decode", "tokamax_xla_contiguous"), ("decode", "xla"),
            ("gemm", "mosaic_fp8_interpret"), ("gemm", "xla_f32"), ("gemm", "ragged_dot_bf16"),
            ("prefill", "tokamax_xla"), ("prefill", "xla")} <= impls
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0 and r["finite"], r
        # bf16 paths round once or twice (2^-9); the FP8 kernel computes in f32 like its reference
        assert r["err_rel"] <= (1e-5 if r["impl"].startswith("mosaic_fp8") else 1e-2), r


def test_full_scale_cases_are_the_issues_shapes_and_count_the_work_they_do():
    import jax

    bench = load_script()
    cases = {c.name: c for c in bench.cases("full", {"decode", "gemm", "prefill"}, sweep=True)}
    decode = cases["decode_attention_B128_kv4989"]
    assert {"flash_mla", "triton", "xla"} <= set(decode.impls) and "decode_attention_B1_kv32768" in cases
    gate_up = cases["expert_gemm_masked_gate_up"]
    assert (gate_up.shapes["rows"], gate_up.shapes["n"], gate_up.shapes["k"]) == (1024, 4096, 7168)
    assert cases["expert_gemm_contiguous_down"].shapes | {"groups": 9, "n": 7168, "k": 2048} == \
        cases["expert_gemm_contiguous_down"].shapes
    assert sum(name.startswith("mosaic_fp8") for name in gate_up.impls) == 5  # default + 4 tile variants
    assert "xla" in cases["prefill_attention_4x4096_prefix0"].skip  # dense 4 x 128 x 4096^2 scores do not fit
    # The FLOPs every TFLOP/s figure divides by are the FLOPs of the computation measured: XLA's own count for
    # the reference implementation at the same full-scale shapes (compiled from abstract inputs; nothing is
    # allocated). The paged reference also scores the padding of each row's last page (4,992 of 4,989).
    for case, ref in ((decode, "xla"), (gate_up, "xla_f32")):
        fn = case.impls[ref][0]
        counted = jax.jit(lambda a: fn(dict(a))).lower(jax.eval_shape(case.make)).compile().cost_analysis()["flops"]
        assert counted == pytest.approx(case.flops, rel=0.01), case.name


def test_full_scale_refuses_on_cpu():
    p = subprocess.run([sys.executable, str(SCRIPT), "--scale", "full"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert p.returncode == 2 and "use a GPU" in p.stderr and p.stderr.count("\n") == 1
