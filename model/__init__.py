"""The DeepSeek-V3 network: pure JAX math in Flax NNX modules; knows nothing about serving."""

import os

# The emulated CPU mesh deadlocks in collectives with XLA:CPU's default thread pool (DESIGN.md,
# measured facts); this must be in the environment before the CPU backend starts.
os.environ.setdefault("PJRT_NPROC", "16")

from model.config import ConfigError, ModelConfig  # noqa: E402
from model.transformer import DeepseekV3  # noqa: E402

__all__ = ["ConfigError", "ModelConfig", "DeepseekV3"]
