"""Every test sees 8 emulated CPU devices; both variables must be set before jax starts."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["PJRT_NPROC"] = "16"  # without it the emulated mesh can hang in collectives (DESIGN.md)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
