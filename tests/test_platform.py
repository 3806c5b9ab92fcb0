"""The platform is configuration, decided once: the deployment's `platform` (auto: the platform of the
devices the mesh is built on) resolves the kernels (model/kernels/registry.py, the one registry), the
quantization's default and the step's XLA options; nothing in the packages asks the backend at trace time,
and importing them changes no flag."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from model import DeepseekV3
from model.attention import MLA
from model.experts import Experts
from model.layers import Linear
from sharding.deployment import COMPILER_OPTIONS, Deployment

ROOT = Path(__file__).resolve().parents[1]


def test_no_code_path_is_decided_by_the_backend():
    found = [f"{p.relative_to(ROOT)}:{i}" for pkg in ("model", "sharding", "serving") for p in (ROOT / pkg).rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"default_backend\(", line)]
    assert not found, found


def test_importing_the_packages_changes_no_flag():
    code = ("import os; before = os.environ.get('XLA_FLAGS'); import model, sharding, serving; "
            "assert os.environ.get('XLA_FLAGS') == before, os.environ.get('XLA_FLAGS')")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)


def test_platform_and_compiler_options_are_deployment_fields():
    auto = Deployment.from_dict({}, "<test>", "auto")
    assert auto.platform_for() == jax.devices()[0].platform == "cpu" and auto.xla_options("cpu") == {}
    gpu = Deployment.from_dict({"platform": "gpu", "compiler_options": {"xla_gpu_enable_triton_gemm": True}},
                               "<test>", "gpu")
    assert gpu.platform_for() == "gpu"  # whatever this host has: an AOT compile for a GPU from a CPU host
    assert gpu.xla_options("gpu") == {**COMPILER_OPTIONS["gpu"], "xla_gpu_enable_triton_gemm": True}
    assert COMPILER_OPTIONS["gpu"]["xla_gpu_enable_latency_hiding_scheduler"] is True
    with pytest.raises(ValueError, match=r"<test>: platform 'cuda' is not one of auto, gpu, cpu, tpu"):
        Deployment.from_dict({"platform": "cuda"}, "<test>")
    with pytest.raises(ValueError, match="compiler_options must map XLA option names"):
        Deployment.from_dict({"compiler_options": {"xla_gpu_enable_triton_gemm": [1]}}, "<test>")


def test_a_gpu_deployment_loads_the_gpu_model_on_a_cpu_host():
    """platform "gpu" on this CPU host: the modules hold the GPU kernels' names (nothing runs them here: the
    GPU program is compiled by scripts/compile_gpu.py), and an FP8 checkpoint stays FP8 by default."""
    net = DeepseekV3.from_pretrained("models/jaxseek-tiny", deployment=Deployment(name="gpu", dp=1, platform="gpu"))
    assert net.quantization == "fp8" and net.kernels.gemm == "mosaic_fp8"
    assert DeepseekV3.from_pretrained("models/jaxseek-tiny").quantization == "none"  # this CPU's default
    kinds = {type(m): m for _, m in __import__("flax").nnx.iter_graph(net) if isinstance(m, (Linear, Experts, MLA))}
    assert {kinds[Linear].gemm, kinds[Experts].gemm, kinds[MLA].gemm} == {"mosaic_fp8"}
    assert (kinds[MLA].decode_kernel, kinds[MLA].sms) == ("flash_mla", 0)  # no GPU device: no SM count
