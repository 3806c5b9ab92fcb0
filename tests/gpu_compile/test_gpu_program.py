"""The GPU program, compiled for an H100 on this CPU machine (scripts/compile_gpu.py: deviceless AOT, the
platform given as configuration, nothing patched): its structure, on which speed depends and which needs
no GPU to see. The small-scale decode and prefill steps (every dimension shrunk, kept on the kernels' tiles;
kv_a_proj's N off them, as DeepSeek's 576 is) and the kernels at DeepSeek-V3's shapes."""

import pytest

pytest.importorskip("jax_plugins.xla_cuda13", reason="needs jax's CUDA plugin: run scripts/test_gpu_compile.sh")

import compile_gpu  # noqa: E402


@pytest.fixture(scope="module", params=["decode", "prefill"])
def step(request):
    return compile_gpu.compile_gpu("step", "h100", ["--phase", request.param, "--scale", "small"])


@pytest.fixture(scope="module")
def kernels():
    return {name: compile_gpu.compile_gpu("kernel", "h100", name) for name in ("flash_mla", "fp8_masked", "fp8_dense")}


def test_no_weight_is_copied_or_dequantised(step):
    """FP8 weights reach their GEMMs whole: no copy of a weight matrix or of its block scales (a scanned
    layer's slice read in place: XLA passes a kernel a stack's slice in place only at 256-byte strides, so
    the scales are held with their K-block axis padded, model/quant.py held_scale_shape) and no float copy
    of an FP8 weight. What is left copied per layer: the RMSNorm weights, one vector each, that XLA's Triton
    normalization fusions read (they take no dynamic slice: docs/DESIGN_NOTES.md)."""
    assert step["dequantized_bytes_per_step"] == 0, step["dequantizing_ops"]
    assert step["weight_slice_copies_per_iteration"] == 0, step["weight_copies"]
    assert step["weight_copies"]["gemm_copied_bytes_per_step"] == 0, step["weight_copies"]
    for loop in step["weight_copies"]["loops"]:
        assert not loop["copies"], loop
        norms = [c for c in loop["other_copies"] if c["op"].endswith("dynamic_slice")]
        assert len(norms) <= 4 and all(c["shape"].startswith("bf16[1,") for c in norms), loop["other_copies"]
    assert not any(c["read_by_gemm"] for c in step["weight_copies"]["outside_loops"])


def test_the_hot_paths_are_the_mosaic_kernels(step):
    """Every FP8 GEMM is a Mosaic kernel (routed experts, projections, the absorbed per-head products);
    decode attention is flash_mla and prefill attention tokamax's Mosaic flash attention; no Triton
    kernel; XLA's only GEMM left is the gate's (BF16, cuBLAS)."""
    kinds, names = step["custom_call_kinds"], {k["kernel"].rsplit("_", 1)[0] for k in step["mosaic_kernels"]}
    assert "triton" not in kinds and kinds.get("cublas", {}).get("call_sites", 0) <= 1, kinds
    assert "fp8_gemm" in names, names
    assert ("flash_mla_decode" if step["phase"] == "decode" else "flash_attention_sm90") in names, names
    assert step["kernels"] == {"attention": "flash_mla" if step["phase"] == "decode" else "tokamax",
                               "gemm": "mosaic_fp8", "expert_dtype": "fp8"}


def test_our_kernels_do_not_spill(step, kernels):
    ours = [k for k in step["mosaic_kernels"] + [k for r in kernels.values() for k in r["mosaic_kernels"]]
            if k["kernel"].startswith(("fp8_gemm", "flash_mla"))]
    assert ours and all(k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0 for k in ours), ours
    assert all(k["smem_bytes"] <= 232_448 for k in ours)  # Hopper's shared memory per block


def test_kernels_at_deepseek_shapes_compile_alone(kernels):
    for name, result in kernels.items():
        assert result["mosaic_kernels"] and all(r["custom_call_kinds"] == {"mosaic": r["custom_call_kinds"]["mosaic"]}
                                                for r in result["kernels"]), (name, result)
