"""Hand-written Pallas kernels (GPU hot paths), each with an XLA reference implementation. Which
one runs is the deployment's choice (sharding/kernels.py: Kernels)."""

from __future__ import annotations

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

# What lower_for_gpu lowers for when no GPU is attached: the GPUs these kernels are written for.
DEFAULT_GPU = "NVIDIA H100 80GB HBM3"


def lower_for_gpu(jitted, *args, device_kind: str = DEFAULT_GPU, platform: str = "cuda"):
    """Traces and lowers `jitted(*args)` (args may be ShapeDtypeStructs) for a GPU, on a machine
    without one.

    Pallas reads the target GPU's compute capability while lowering; with no GPU attached (jax
    0.11 raises "No supported GPU devices found") it takes it from an abstract device, which must
    be in context while tracing too (the trace records the mesh context lowering sees).
    """
    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    mesh = AbstractMesh((1,), ("gpu",), (AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jitted.trace(*args).lower(lowering_platforms=(platform,))
