"""How the network is laid over devices, as data: the mesh, the logical-axis rules, the deployment
tree, the kernel choices, the expert-parallel layout (EPConfig) and EPLB placement.

May import: nothing. (It is data: model/ and serving/ read it; the expert-parallel compute and the
overlap schedules that use it live with the model, in model/ep.py and model/overlap.py.)
"""

import os

os.environ.setdefault("PJRT_NPROC", "16")  # see model/__init__.py: the emulated mesh needs it
# On GPU, XLA overlaps the all-to-alls with compute only with its latency-hiding scheduler; the
# flag is inert on other backends. Like every XLA flag it must be set before the backend starts.
if "xla_gpu_enable_latency_hiding_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_latency_hiding_scheduler=true").strip()

from sharding.mesh import make_mesh  # noqa: E402

__all__ = ["make_mesh"]
