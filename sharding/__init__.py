"""How the network is laid over devices: the mesh, the logical-axis rules, the deployment tree,
the kernel choices, EPLB placement, and (for now) the expert-parallel stages.

May import: model.quant, model.experts, model.kernels. (Only sharding/ep.py's expert compute does:
FP8 payloads and the one routed-expert FFN. Nothing here imports the network itself.)
"""

import os

os.environ.setdefault("PJRT_NPROC", "16")  # see model/__init__.py: the emulated mesh needs it
# On GPU, XLA overlaps the all-to-alls with compute only with its latency-hiding scheduler; the
# flag is inert on other backends. Like every XLA flag it must be set before the backend starts.
if "xla_gpu_enable_latency_hiding_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_latency_hiding_scheduler=true").strip()

from sharding.mesh import make_mesh  # noqa: E402

__all__ = ["make_mesh"]
