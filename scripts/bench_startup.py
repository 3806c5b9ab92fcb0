"""Server startup, cold and warm: `python -m serving.server` started twice on one compilation cache
directory (a fresh one unless given), each timed from launch to its first `GET /health` = 200
(weights loaded, every shape bucket compiled or loaded). The second start is the one users see
after the first: it loads every compiled step whole (serving/aot.py: no tracing, lowering or
compiling); with --no-serialized-steps JAX's persistent cache spares it XLA's compilation only.

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
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read()}")
            if time.perf_counter() - began > args.timeout_s:
                raise SystemExit("the server did not come up in time")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        ready = time.perf_counter() - began
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    warm = re.search(r"warm-up: (\d+) compilations, (\d+) programs loaded in ([\d.]+)s", err)
    return {"ready_s": round(ready, 1), "compiled": int(warm[1]) if warm else None,
            "loaded": int(warm[2]) if warm else None, "warmup_s": float(warm[3]) if warm else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployment", help="deployment file (default: every device present)")
    ap.add_argument("--model", help="checkpoint (default: the embedded tiny model)")
    ap.add_argument("--cache-dir", help="compilation cache directory (default: a fresh temporary one)")
    ap.add_argument("--serialized-steps", action=argparse.BooleanOptionalAction, default=True,
                    help="the server's --serialized-steps (its default: on)")
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--cpu-devices", type=int, default=8, help="emulated CPU devices (the servers inherit them)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ.setdefault("PJRT_NPROC", str(2 * args.cpu_devices))  # the emulated mesh needs it
    with tempfile.TemporaryDirectory() as fresh:
        cache = args.cache_dir or fresh
        cold = start_once(args, cache)
        warm = start_once(args, cache)
    load = os.getloadavg()[0]
    report = {"deployment": args.deployment, "first_start": cold, "second_start": warm, "load_average": load}
    print(json.dumps(report) if args.json else
          f"first start {cold['ready_s']} s ({cold['compiled']} programs compiled), second start {warm['ready_s']} s "
          f"({warm['compiled']} compiled, {warm['loaded']} loaded) "
          f"(load average {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
