"""The device mesh and the one table that maps logical axis names to mesh axes."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("dp", "tp")

# Every parameter and activation dimension carries one of these names (model/*.py declares
# them); a new layout is a new table, not new model code. DeepSeek's deployment is tp = 1:
# attention, dense and shared-expert weights replicated (DP attention), routed experts over all.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": "dp",
    "expert": ("dp", "tp"),
    "heads": "tp",
    "mlp": "tp",
    "layers": None,
    "embed": None,
    "vocab": None,
    "kv_latent": None,
    "q_lora": None,
    "expert_mlp": None,
    # activations and caches of the serving engine
    "kv_blocks": "dp",  # the paged KV pool's block axis: each dp rank holds its own requests' blocks
}


def make_mesh(dp: int, tp: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if dp < 1 or tp < 1:
        raise ValueError(f"mesh dp={dp}, tp={tp}: both must be >= 1")
    if dp * tp > len(devices):
        raise ValueError(f"mesh dp={dp} x tp={tp} needs {dp * tp} devices, only {len(devices)} available")
    return Mesh(np.asarray(devices[:dp * tp]).reshape(dp, tp), MESH_AXES)


def logical_to_spec(axes, rules=LOGICAL_RULES) -> PartitionSpec:
    unknown = [a for a in axes if a is not None and a not in rules]
    if unknown:
        raise KeyError(f"logical axes {unknown} have no rule in sharding.mesh.LOGICAL_RULES")
    spec = [rules[a] if a is not None else None for a in axes]
    used = [m for s in spec if s for m in ((s,) if isinstance(s, str) else s)]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {axes} map two dimensions onto one mesh axis: {spec}")
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, *axes) -> NamedSharding:
    """The sharding of an array whose dimensions carry these logical names (None: replicated)."""
    return NamedSharding(mesh, logical_to_spec(axes))


def logical_size(mesh: Mesh, axis: str) -> int:
    """How many ways the mesh splits a dimension named `axis` (e.g. "batch": the dp ranks)."""
    spec = logical_to_spec((axis,))[0]
    return int(np.prod([mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec or ())]))


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding of every parameter, from the logical axes declared with it."""
    def one(var):
        spec = logical_to_spec(var.get_metadata()["out_sharding"])
        for dim, mesh_axes in zip(var.shape, spec):
            size = int(np.prod([mesh.shape[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else
                                                         mesh_axes or ())]))
            if dim % size:
                raise ValueError(f"a parameter of shape {var.shape} cannot be split {size} ways along {mesh_axes} "
                                 f"(spec {spec})")
        return NamedSharding(mesh, spec)
    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def initialize_multihost(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, *, init_timeout_s: int = 60,
                         heartbeat_timeout_s: int = 10) -> None:
    """Joins this process to a multi-controller JAX job: afterwards jax.devices() lists every
    process's devices and one mesh spans them all. With no arguments the cluster environment
    (SLURM, ...) is read by jax.distributed. A process that dies is noticed by the others within
    heartbeat_timeout_s, which then abort naming it ("Task N heartbeat timeout") instead of hanging
    in a collective."""
    if num_processes is not None and (num_processes < 1 or process_id is None or not 0 <= process_id < num_processes):
        raise ValueError(f"process id {process_id} is outside [0, {num_processes}) (--num-processes {num_processes})")
    if num_processes not in (None, 1) and coordinator is None:
        raise ValueError("a multi-process launch needs --coordinator host:port (process 0's address)")
    if coordinator is not None and process_id:
        # jax aborts the whole process (no Python exception) when the coordinator never answers
        _wait_for_coordinator(coordinator, init_timeout_s, process_id, num_processes)
    # CPU devices of different processes talk through gloo; the setting is inert on GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=init_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except Exception as e:  # jax raises several types for an unreachable coordinator or a bad cluster env
        raise RuntimeError(f"process {process_id} of {num_processes} could not join the coordinator at "
                           f"{coordinator} within {init_timeout_s} s: {e}") from None


def _wait_for_coordinator(coordinator: str, timeout_s: float, process_id, num_processes) -> None:
    """Returns once process 0's coordinator accepts connections; raises a clear error otherwise."""
    import socket
    import time
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator must be host:port, got {coordinator!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {process_id} of {num_processes} could not join the coordinator at "
                                   f"{coordinator} within {timeout_s} s: {e}") from None
            time.sleep(0.5)
