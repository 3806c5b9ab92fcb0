"""The GPU-compile suite (scripts/test_gpu_compile.sh runs it in .venv-gpu, with --confcutdir so that
tests/conftest.py's emulated CPU mesh is not set up): the H100 program compiled on this CPU machine.
The main suite does not collect this folder (tests/conftest.py: collect_ignore)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin compiles for a GPU target without a driver
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
