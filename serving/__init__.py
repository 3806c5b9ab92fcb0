"""The host side: engine, scheduler, model runner, paged KV cache, sampling, the Python API.

May import: model, sharding. (Nothing below serving imports it.)
"""

import os

os.environ.setdefault("PJRT_NPROC", "16")  # see model/__init__.py: the emulated mesh needs it

from serving.api import LLM, RequestOutput  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
