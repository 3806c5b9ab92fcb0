"""Every test sees 8 emulated CPU devices; both variables must be set before jax starts."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["PJRT_NPROC"] = "16"  # without it the emulated mesh can hang in collectives (docs/DESIGN_NOTES.md)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the subprocesses some start) compile the same programs: share them through
# JAX's persistent compilation cache (keyed by the program and the jax version, so never stale).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
