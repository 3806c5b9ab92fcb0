"""How the network is laid over devices, as data: the mesh, the logical-axis rules, the deployment
tree, the kernel choices, the expert-parallel layout (EPConfig) and EPLB placement.

May import: nothing. (It is data: model/ and serving/ read it; the expert-parallel compute and the
overlap schedules that use it live with the model, in model/ep.py and model/overlap.py.)
"""

import os

os.environ.setdefault("PJRT_NPROC", "16")  # see model/__init__.py: the emulated mesh needs it
# (XLA's GPU options, the latency-hiding scheduler among them, are the step's jit compiler_options:
# sharding/deployment.py COMPILER_OPTIONS. Importing changes no flag.)

from sharding.mesh import make_mesh  # noqa: E402

__all__ = ["make_mesh"]
