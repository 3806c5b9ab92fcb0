"""Server startup, cold and warm: `python -m serving.server` started twice on one compilation cache
directory (a fresh one unless given), each timed from launch to its first `GET /health` = 200
(weights loaded; the shape buckets that hold any batch compiled or loaded, serving/warmup.py), and
then to every shape bucket ready (the rest compile in the background while the server serves:
/health's `warmup.done`). The first server runs until all are ready, so the second start finds the
cache a first start leaves. The second start loads every compiled step whole (serving/aot.py: no
tracing, lowering or compiling); with --no-serialized-steps JAX's persistent cache spares it XLA's
compilation only.

    python scripts/bench_startup.py --deployment configs/deploy/cpu8.json [--no-serialized-steps] --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_once(args, cache: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "serving.server", "--port", str(port), "--compilation-cache-dir", cache,
           "--log-level", "warning"] + (["--deployment", args.deployment] if args.deployment else []) + \
        (["--model", args.model] if args.model else []) + [
            "--serialized-steps" if args.serialized_steps else "--no-serialized-steps"]
    import httpx
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    ready = done = health = None
    try:
        while done is None:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read()}")
            if time.perf_counter() - began > args.timeout_s:
                raise SystemExit("the server did not come up in time")
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if r.status_code == 200:
                    if ready is None:
                        ready, cpu = time.perf_counter() - began, cpu_seconds(proc.pid)
                    health = r.json().get("warmup")
                    if not args.all_ready or health is None or health["done"] or health["error"]:
                        done = time.perf_counter() - began
            except httpx.TransportError:
                pass
            time.sleep(0.1 if ready is None else 1.0)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    warm = re.search(r"warm-up: (\d+) compilations, (\d+) programs loaded in ([\d.]+)s", err)
    # cpu_s: the server's CPU time (all its threads) by its first /health 200: what it needs of a
    # 2-core machine whatever else runs there (ready_s <= cpu_s on an idle one)
    out = {"ready_s": round(ready, 1), "cpu_s": round(cpu, 1), "compiled": int(warm[1]) if warm else None,
           "loaded": int(warm[2]) if warm else None, "warmup_s": float(warm[3]) if warm else None}
    if args.all_ready:
        out.update(all_ready_s=round(done, 1), warmup=health)
    out["log"] = [line for line in err.splitlines() if line.startswith("[server]")]  # its start-up progress
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployment", help="deployment file (default: every device present)")
    ap.add_argument("--model", help="checkpoint (default: the embedded tiny model)")
    ap.add_argument("--cache-dir", help="compilation cache directory (default: a fresh temporary one)")
    ap.add_argument("--serialized-steps", action=argparse.BooleanOptionalAction, default=True,
                    help="the server's --serialized-steps (its default: on)")
    ap.add_argument("--all-ready", action=argparse.BooleanOptionalAction, default=True,
                    help="keep each server until every shape bucket is ready (the first leaves a whole cache)")
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--cpu-devices", type=int, default=8, help="emulated CPU devices (the servers inherit them)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ.setdefault("PJRT_NPROC", str(2 * args.cpu_devices))  # the emulated mesh needs it
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as fresh:
        cache = args.cache_dir or fresh
        cold = start_once(args, cache)
        loads.append(os.getloadavg()[0])
        warm = start_once(args, cache)
    loads.append(os.getloadavg()[0])
    load = max(loads)
    report = {"command": " ".join(["python", "scripts/bench_startup.py", *(argv or sys.argv[1:])]),
              "commit": commit.strip(), "device": f"cpu{args.cpu_devices} ({os.cpu_count()} cores)",
              "deployment": args.deployment, "first_start": cold, "second_start": warm,
              "load_average": load, "load_average_before_between_after": loads}
    all_ready = f", every bucket ready at {cold['all_ready_s']} s" if args.all_ready else ""
    print(json.dumps(report) if args.json else
          f"first start {cold['ready_s']} s to /health ({cold['compiled']} programs compiled{all_ready}), second "
          f"start {warm['ready_s']} s ({warm['compiled']} compiled, {warm['loaded']} loaded) (load average {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
