"""scripts/bench_shard.py: one GPU's share of DeepSeek's deployment, run at --scale small on the CPU.

The script runs as subprocesses (all started together, so the two CPU cores overlap them); the
report's fields are checked for presence and sign, and the steps it times are checked against the model
(the absorbed decode against the naive form, the chunked prefill against one call).
The GPU code path (Pallas kernels reading every layer's pages and experts in place) is checked
by lowering the full-scale step for CUDA and by running its kernels in interpret mode here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.quant import held_scale_shape

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_shard.py"
SMALL = {"layers": 4, "dense_layers": 1, "moe_layers": 3, "hidden": 256, "moe_intermediate": 128}
RUNS = {
    "decode": ["--phase", "decode", "--scale", "small", "--json", "--steps", "2"],
    "prefill": ["--phase", "prefill", "--scale", "small", "--json", "--steps", "2"],
    "decode_mtp": ["--phase", "decode", "--scale", "small", "--json", "--steps", "2", "--mtp", "1", "--acceptance", "0.9"],
    "refuse_full": ["--phase", "decode", "--scale", "full"],
    "lower_decode": ["--phase", "decode", "--check-lowering", "cuda"],
    "lower_prefill": ["--phase", "prefill", "--check-lowering", "cuda", "--prefill-kernel", "xla"],
}


@pytest.fixture(scope="module")
def runs():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {name: subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, argv in RUNS.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = (p.returncode, out, err)
    return results


def report(runs, phase) -> dict:
    rc, out, err = runs[phase]
    assert rc == 0, err[-3000:]
    return json.loads(out)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_report_fields(runs, phase):
    r = report(runs, phase)
    import jax
    assert (r["phase"], r["scale"], r["platform"]) == (phase, "small", "cpu")
    assert r["jax_version"] == jax.__version__
    assert r["device"]
    assert r["steps"] == 2 and len(r["step_ms_all"]) == 2
    assert all(t > 0 for t in r["step_ms_all"])
    assert r["step_ms"] == pytest.approx(statistics.median(r["step_ms_all"]))
    assert r["tokens_per_s_per_gpu"] > 0 and r["ratio_to_published"] > 0
    assert r["finite"] is True
    assert {k: r["shapes"][k] for k in SMALL} == SMALL
    # routed experts stay FP8; the platform's kernels (the registry's XLA references on a CPU)
    assert r["kernels"] == {"attention": "xla", "gemm": "xla", "expert_dtype": "fp8"}
    assert any("all-to-all replaced" in n for n in r["notes"])


def test_measured_decode_step_is_the_model():
    """What the decode benchmark times computes the model: its absorbed-MLA step over the paged pool gives
    the hidden states of the naive form (kv_b_proj applied to the cached latents: prefill's attention) over
    the same pages, and writes exactly one new row per request and layer, at the request's position.
    float32 and BF16 weights, so the two forms differ only by rounding."""
    import functools

    import jax
    from flax import nnx

    from serving.kv_cache import PagedCache

    bench = _bench_module()
    setup = bench.make_setup(bench.parse_args(["--phase", "decode", "--scale", "small", "--dtype", "fp32",
                                               "--quantization", "none"]), "cpu")
    graphdef, state = bench.rank_model(setup, 1, False)
    inputs = bench.decode_inputs(setup, False)
    hidden, pool, _ = jax.jit(functools.partial(bench.decode_step, graphdef=graphdef, setup=setup))(state, **inputs)

    def naive(state, pool, tokens, page_table, positions):
        net = nnx.merge(graphdef, state)
        return net.forward_step(tokens, positions, PagedCache(pool, page_table), absorbed=False)[0]
    want = np.asarray(jax.jit(naive)(state, **inputs))
    np.testing.assert_allclose(np.asarray(hidden), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    changed = np.any(np.asarray(pool) != np.asarray(inputs["pool"]), axis=-1)  # [L, NB, BS]
    pos, table = setup.kv_len - 1, np.asarray(inputs["page_table"])
    expect = np.zeros_like(changed)
    expect[:, table[:, pos // setup.block_size], pos % setup.block_size] = True
    assert changed.sum() == setup.batch * setup.cfg.num_hidden_layers and (changed == expect).all()


def test_measured_prefill_step_is_the_model():
    """What the prefill benchmark times (each prompt in attention chunks, every chunk attending to the
    prompt's pages so far) gives the last position's hidden state and the cache rows of one call over the
    whole prompt."""
    import dataclasses
    import functools

    import jax

    bench = _bench_module()
    setup = bench.make_setup(bench.parse_args(["--phase", "prefill", "--scale", "small", "--dtype", "fp32",
                                               "--quantization", "none"]), "cpu")
    assert setup.prompt_len // setup.attn_chunk >= 2
    graphdef, state = bench.rank_model(setup, 1, False)
    inputs = bench.prefill_inputs(setup, False)
    out = {}
    for name, s in (("chunked", setup), ("whole", dataclasses.replace(setup, attn_chunk=setup.prompt_len))):
        hidden, pool = jax.jit(functools.partial(bench.prefill_step, graphdef=graphdef, setup=s))(state, **inputs)
        out[name] = np.asarray(hidden), np.asarray(pool)
    for got, want in zip(out["chunked"], out["whole"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.any(out["whole"][1] != 0, axis=-1).all()  # every position of every prompt was written


@pytest.mark.parametrize("phase,ranks,local", [("decode", 144, 2), ("prefill", 32, 9)])
def test_deployment_share(runs, phase, ranks, local):
    """EP144 holds 2 of the 288 expert slots per rank, EP32 9; each rank computes k x its tokens rows."""
    r = report(runs, phase)
    s = r["shapes"]
    assert (r["ep_ranks"], s["routed_experts_local"], s["shared_experts"]) == (ranks, local, 1)
    assert s["expert_rows_per_layer"] == s["experts_per_token"] * s["tokens_per_step"] == 8 * s["tokens_per_step"]


def test_mtp_step_verifies_k_plus_one_rows_next_to_the_plain_step(runs):
    """--mtp 1: the step runs 2 query rows per request plus the MTP module (its own KV layer), and
    reports tokens per user at the given acceptance (1 + a per step) beside the plain step's."""
    r, plain = report(runs, "decode_mtp"), report(runs, "decode")
    s, sp = r["shapes"], r["speculative"]
    assert (s["mtp"], s["tokens_per_step"]) == (1, 2 * s["batch"]) and r["finite"] is True
    assert sp["num_tokens"] == 1 and sp["tokens_per_step_per_request"] == pytest.approx(1.9)
    step_s = r["step_ms"] / 1e3
    assert r["tokens_per_s_per_user"] == pytest.approx(1.9 / step_s, rel=1e-9)
    assert r["tokens_per_s_per_gpu"] == pytest.approx(s["batch"] * 1.9 / step_s, rel=1e-9)
    assert sp["plain_tokens_per_s_per_user"] == pytest.approx(1e3 / sp["plain_step_ms"], rel=1e-9)
    assert sp["speedup_per_user"] == pytest.approx(r["tokens_per_s_per_user"] / sp["plain_tokens_per_s_per_user"])
    # the MTP module's weights and its KV layer are read too
    assert r["roofline"]["work"]["replicated_weights"] > plain["roofline"]["work"]["replicated_weights"]
    assert r["roofline"]["work"]["kv_cache"] == plain["roofline"]["work"]["kv_cache"] * (s["layers"] + 1) / s["layers"]


def test_decode_roofline_bytes(runs):
    r = report(runs, "decode")
    s, roof = r["shapes"], r["roofline"]
    work = roof["work"]
    assert work["kv_cache"] == s["batch"] * s["kv_len"] * s["cache_row"] * 2 * s["layers"]
    # FP8: one byte per expert weight plus its float32 128x128 block scales as held on device (K-block axis
    # padded to a 256-byte slice: model/quant.py), for gate and up [F, D] and down [D, F]
    D, F = s["hidden"], s["moe_intermediate"]
    per_expert = 3 * D * F + 4 * (2 * math.prod(held_scale_shape((F, D))) + math.prod(held_scale_shape((D, F))))
    assert work["expert_weights"] == s["moe_layers"] * s["routed_experts_local"] * per_expert
    assert work["total"] == work["replicated_weights"] + work["expert_weights"] + work["kv_cache"]
    assert work["replicated_weights"] > work["expert_weights"] > 0
    assert roof["achieved"] == pytest.approx(work["total"] / (r["step_ms"] / 1e3), rel=1e-9)
    assert roof["basis"] == "hbm_bandwidth" and roof["peak"] is None and roof["percent"] is None  # CPU: n/a


def test_prefill_roofline_flops(runs):
    r = report(runs, "prefill")
    s, roof = r["shapes"], r["roofline"]
    work = roof["work"]
    T, D, F = s["tokens_per_step"], s["hidden"], s["moe_intermediate"]
    routed = s["moe_layers"] * 2 * 8 * T * 3 * D * F  # the rank's 8 x T (token, expert) rows
    assert work["ffn"] > routed
    assert work["model"] == work["attention_model"] + work["ffn"]
    assert work["executed"] > work["model"]  # chunked naive attention computes masked scores too
    assert roof["achieved"] == pytest.approx(work["model"] / (r["step_ms"] / 1e3), rel=1e-9)
    assert roof["basis"] == "bf16_tensor_core" and roof["peak"] is None and roof["percent"] is None


def test_full_scale_refused_on_cpu(runs):
    rc, out, err = runs["refuse_full"]
    assert rc == 2 and out == ""
    assert "--scale small" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("phase,kernels", [("decode", 13), ("prefill", 11)])
def test_full_scale_lowers_for_gpu(runs, phase, kernels):
    """Full DeepSeek shapes, lowered for CUDA from abstract arrays with the GPU's kernels (the platform as
    configuration, nothing patched): every GEMM a Mosaic FP8 kernel (kernel functions of distinct shapes in
    the module), no Triton kernel, decode attention flash_mla (the compiled program's structure:
    tests/gpu_compile)."""
    rc, out, err = runs[f"lower_{phase}"]
    assert rc == 0, err[-3000:]
    attention = "flash_mla" if phase == "decode" else "xla"  # (tokamax lowers only beside a GPU device)
    found = re.search(rf"(\d+) Mosaic GPU and (\d+) Triton \(Pallas\) kernel call sites, attention={attention}, "
                      rf"gemm=mosaic_fp8", out)
    assert found and (int(found.group(1)), int(found.group(2))) == (kernels, 0), out


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_shard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_gpu_path_matches_xla_path():
    """A decode kernel (the Pallas one, interpret mode) in the engine's decode step, reading layer l's pages
    of the shared pool in place, agrees with the XLA path, with every layer's pages and experts made distinct
    so a wrong layer offset would show."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from model.kernels import registry
    from sharding.kernels import Kernels

    bench = _bench_module()
    # float32 weights and activations: in bfloat16, or through FP8 quantisation of the activations, the two
    # paths' last-bit differences flip a few tokens' expert choices or e4m3 steps, which says nothing about
    # the kernel
    ref = bench.make_setup(bench.parse_args(["--phase", "decode", "--scale", "small", "--dtype", "fp32",
                                             "--quantization", "none"]), "cpu")
    L = ref.cfg.num_hidden_layers

    def per_layer(path, a):  # each MoE layer's expert weights times (1 + its index)
        if "experts" not in jax.tree_util.keystr(path) or "absorbed" in jax.tree_util.keystr(path):
            return a
        return a * (1 + jnp.arange(a.shape[0], dtype=a.dtype)).reshape(-1, *[1] * (a.ndim - 1))

    def run(setup):
        """-> the output with distinct layers, and (same compiled step) with one layer repeated."""
        fn, inputs, _ = bench.build(setup)
        pool = inputs["pool"]
        factor = 1 + jnp.arange(L, dtype=jnp.float32)[:, None]
        distinct = dict(inputs, pool=(pool.reshape(L, -1) * factor).astype(pool.dtype).reshape(pool.shape),
                        state=jax.tree_util.tree_map_with_path(per_layer, inputs["state"]))
        out = fn(*distinct.values())[0]  # donates only its own pool: `inputs` stays valid
        return np.asarray(out, np.float32), np.asarray(fn(*inputs.values())[0], np.float32), fn, inputs

    want, same_layers, fn, inputs = run(ref)
    # (the Mosaic FP8 GEMMs' interpreter takes ~1.6 s a call: they are checked per GEMM, test_fp8.py)
    got, _, _, _ = run(dataclasses.replace(ref, kernels=registry.resolve(Kernels(attention_decode="triton_interpret"),
                                                                         "cpu")))
    tol = 0.02 * np.abs(want).max()  # rounding of different summation orders
    assert np.abs(got - want).max() <= tol
    assert np.abs(same_layers - want).max() > 10 * tol  # the distinct layers do change the output
    # each layer writes its B new rows into its own pages of the shared pool
    _, pool, _ = fn(*dict(inputs, pool=jnp.zeros_like(inputs["pool"])).values())
    rows_written = np.asarray(jnp.any(pool.reshape(L, -1, pool.shape[-1]) != 0, axis=-1).sum(axis=1))
    assert rows_written.tolist() == [ref.batch] * L
