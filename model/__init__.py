"""The DeepSeek-V3 network: pure JAX math in Flax NNX modules; knows nothing about serving.

May import: sharding. (Its data: the logical-axis rules, the deployment, the kernel choices, the
expert-parallel layout EPConfig. The expert-parallel compute is model/ep.py, the overlap schedules
model/overlap.py.)
"""

import os

# The emulated CPU mesh deadlocks in collectives with XLA:CPU's default thread pool
# (docs/DESIGN_NOTES.md); this must be in the environment before the CPU backend starts.
os.environ.setdefault("PJRT_NPROC", "16")

from model.config import ConfigError, ModelConfig  # noqa: E402
from model.transformer import DeepseekV3  # noqa: E402

__all__ = ["ConfigError", "ModelConfig", "DeepseekV3"]
