"""Launch one jaxseek command as N local processes of one multi-controller JAX job (for testing
the multi-host path on one machine; a cluster runs one process per host, see README).

    python scripts/launch_multihost.py --local-processes 2 --cpu-devices-per-process 4 -- \\
        python -m serving.generate --deployment configs/deploy/cpu8.json --prompt-ids 0,5,9

Each process gets JAXSEEK_COORDINATOR / JAXSEEK_NUM_PROCESSES / JAXSEEK_PROCESS_ID (read by
`python -m serving.generate` and the server) and, on CPU, its own emulated devices. Process 0's
output is passed through; the others' stderr is prefixed. If a process dies, the launcher says
which and stops the rest (they also abort on their own once its heartbeats stop). SIGTERM or Ctrl-C
is passed to process 0 only: `python -m serving.server` there drains and stops every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, count: int, cpu_devices: int, coordinator: str) -> dict:
    env = dict(os.environ)
    # the caller's other XLA flags carry over; the device count is this process's
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(JAXSEEK_COORDINATOR=coordinator, JAXSEEK_NUM_PROCESSES=str(count), JAXSEEK_PROCESS_ID=str(index),
               PYTHONUNBUFFERED="1", PJRT_NPROC=str(2 * cpu_devices),
               XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"]))
    return env


def spawn(command: list[str], count: int, cpu_devices: int, port: int | None = None) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{port or free_port()}"
    return [subprocess.Popen(command, env=process_env(i, count, cpu_devices, coordinator),
                             stdout=None if i == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(count)]


def _relay(proc: subprocess.Popen, index: int) -> None:
    for line in proc.stderr:
        sys.stderr.write(line if index == 0 else f"[process {index}] {line}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local-processes", type=int, required=True)
    ap.add_argument("--cpu-devices-per-process", type=int, default=4)
    ap.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    if args.local_processes < 1 or args.cpu_devices_per_process < 1:
        ap.error("--local-processes and --cpu-devices-per-process must be >= 1")
    procs = spawn(command, args.local_processes, args.cpu_devices_per_process, args.port)
    # SIGTERM / Ctrl-C go to process 0 alone: a server there drains its requests and stops the others
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: procs[0].poll() is None and procs[0].send_signal(signal.SIGTERM))
    relays = [threading.Thread(target=_relay, args=(p, i), daemon=True) for i, p in enumerate(procs)]
    for t in relays:
        t.start()
    failed = None
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.poll() not in (None, 0) and failed is None:
                failed = (i, p.returncode)
                print(f"[launch] process {i} exited with code {p.returncode}; stopping the others", file=sys.stderr)
                for other in procs:
                    if other.poll() is None:
                        other.terminate()
        time.sleep(0.2)
    for t in relays:
        t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if failed or any(codes):
        index, code = failed or next((i, c) for i, c in enumerate(codes) if c)
        print(f"[launch] failed: process {index} exited with code {code} (all codes: {codes})", file=sys.stderr)
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
