"""Every test sees 8 emulated CPU devices; both variables must be set before jax starts."""

import os
from pathlib import Path

# LLVM at -O0: the suite is mostly compilation (a tiny-model engine step compiles in 9.0 s at the
# default level, 4.9 s at 0, and runs in 55 ms instead of 24 at batch 64), so it runs in about half
# the time; the suite passes at either level (docs/DESIGN_NOTES.md). Speed is measured by scripts/bench_*.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ["PJRT_NPROC"] = "16"  # without it the emulated mesh can hang in collectives (docs/DESIGN_NOTES.md)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the subprocesses some start) compile the same programs: share them through
# JAX's persistent compilation cache (keyed by the program and the jax version, so never stale).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# The GPU program's structure is checked in a venv of its own (scripts/test_gpu_compile.sh): not here.
collect_ignore = ["gpu_compile"]

# The slowest files first (single-process seconds on 2 cores: disagg 190, engine 184, multihost 85,
# ep 75, ...): the two workers take whole files in this order, so the long ones do not start last
# and leave one worker running alone at the end.
SLOW_FIRST = ("test_disagg.py", "test_engine.py", "test_multihost.py", "test_ep.py", "test_speculative.py",
              "test_overlap.py", "test_server_soak.py", "test_eplb_live.py", "test_server.py", "test_bench_shard.py",
              "test_disk_tier.py", "test_model.py", "test_server_overflow.py", "test_mla_decode.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file's own order kept
