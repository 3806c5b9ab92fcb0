"""How the network is laid over devices: the mesh, the logical-axis rules, expert parallelism."""

import os

os.environ.setdefault("PJRT_NPROC", "16")  # see model/__init__.py: the emulated mesh needs it

from sharding.mesh import make_mesh  # noqa: E402

__all__ = ["make_mesh"]
