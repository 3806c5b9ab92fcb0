"""The host side: engine, scheduler, paged KV cache, sampling, the Python API (built on model and sharding)."""

import os

os.environ.setdefault("PJRT_NPROC", "16")  # see model/__init__.py: the emulated mesh needs it

from serving.api import LLM, RequestOutput  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
