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

# The slowest files first: the two workers take whole files in this order, so the long ones do not
# start last and leave one worker running alone at the end. The two multi-process files
# (test_multihost_server.py, not listed, comes late) should not run at the same time: each starts
# processes of its own, and on 2 cores together they slow each other (a cold run: 923 s in this
# order, 997 s with them adjacent).
SLOW_FIRST = ("test_disagg.py", "test_engine.py", "test_multihost.py", "test_ep.py", "test_speculative.py",
              "test_overlap.py", "test_server_soak.py", "test_eplb_live.py", "test_server.py", "test_bench_shard.py",
              "test_disk_tier.py", "test_model.py", "test_server_overflow.py", "test_mla_decode.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file's own order kept


# Where the suite's time goes: XLA compile seconds per file (this process's compilations; servers in
# subprocesses compile uncounted), printed after the run. Most of a cold run is compilation, so this
# names the files to make cheaper (fewer distinct programs) when the suite nears its 15-minute bound.
_compile = {"s": 0.0, "n": 0}


def _on_duration(event: str, secs: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compile["s"] += secs
        _compile["n"] += 1


def pytest_configure(config):
    import jax.monitoring
    jax.monitoring.register_event_duration_secs_listener(_on_duration)


def pytest_runtest_protocol(item, nextitem):
    item.user_properties.append(("compile_before", dict(_compile)))


def pytest_runtest_makereport(item, call):
    if call.when == "teardown":
        before = dict(item.user_properties).get("compile_before", _compile)
        item.user_properties.append(("xla_compile", (_compile["s"] - before["s"], _compile["n"] - before["n"])))


def pytest_terminal_summary(terminalreporter):
    files: dict[str, list[float]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            props = dict(getattr(report, "user_properties", ()) or ())
            if getattr(report, "when", None) == "teardown" and "xla_compile" in props:
                secs, n = props["xla_compile"]
                total = files.setdefault(report.nodeid.split("::")[0], [0.0, 0, 0.0])
                total[0] += secs
                total[1] += n
            if getattr(report, "when", None) in ("setup", "call", "teardown"):
                files.setdefault(report.nodeid.split("::")[0], [0.0, 0, 0.0])[2] += report.duration
    if not files:
        return
    rows = sorted(files.items(), key=lambda kv: -kv[1][2])[:15]
    terminalreporter.write_sep("-", f"slowest files: seconds, of which XLA compiling (programs compiled or loaded)")
    for name, (secs, n, wall) in rows:
        terminalreporter.write_line(f"{wall:7.1f} s  {secs:7.1f} s compiling ({n:3d})  {name}")
