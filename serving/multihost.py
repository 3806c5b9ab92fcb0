"""Serving over a multi-process JAX job: process 0 decides, every process steps (docs/SERVER.md,
"Multi-host serving").

One SPMD program spans every process, so every process must run the same engine steps on the same
requests. Process 0 owns the HTTP front; each time its engine thread steps (or takes requests in or
out) it publishes one small message, the step's INPUTS — requests added (prompt ids, sampling
parameters), requests aborted (client gone, shutdown), and whether it steps — through the JAX
distributed client's key-value store. Followers (`follow`) apply the same inputs and run the same
deterministic scheduler, so their steps match process 0's without the scheduler's decisions ever
crossing the wire. Decisions that read local state (the disk tier's files) are made once by one
process and shared the same way (`Shared.agree`, used by serving/disk_tier.py).

Faults: a follower beats a counter in the store twice a second (`beat`); `watch` on process 0 sees
one stand still for 5 s, fails /health naming it and exits
non-zero, before JAX's own 10 s heartbeat timeout ends the job. A follower whose process 0 is gone
is stopped by the coordination service itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import threading
import time

log = logging.getLogger("serving.multihost")

KEEP = 1024  # messages kept in the store behind the newest (a follower is at most a step behind)
POLL_MS = 1000  # a follower waiting for the next step looks up every this often


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def add_flags(ap) -> None:
    """The multi-host flags of `python -m serving.generate` and `python -m serving.server`."""
    multi = ap.add_argument_group("multi-host (one command per process; scripts/launch_multihost.py sets these)")
    multi.add_argument("--coordinator", default=os.environ.get("JAXSEEK_COORDINATOR"), help="process 0's host:port")
    multi.add_argument("--num-processes", type=int, default=_env_int("JAXSEEK_NUM_PROCESSES"))
    multi.add_argument("--process-id", type=int, default=_env_int("JAXSEEK_PROCESS_ID"))
    multi.add_argument("--init-timeout", type=int, default=60, help="seconds to wait for every process to join")


def join(args) -> bool:
    """Joins the job the flags (or the cluster environment) describe; False if this is a one-process
    run. Raises ValueError / RuntimeError in one sentence for a bad launch."""
    if args.num_processes in (None, 1) and "SLURM_JOB_ID" not in os.environ:
        return False
    from sharding.mesh import initialize_multihost
    initialize_multihost(args.coordinator, args.num_processes, args.process_id, init_timeout_s=args.init_timeout)
    import jax
    return jax.process_count() > 1


def uncached(multi: bool) -> bool:
    """True (and JAX's persistent compilation cache turned off, with a line saying so) for a
    multi-process job on CPU devices: there, a second start that loaded its programs from the cache
    died in its first collective ("gloo ... Received data size doesn't match expected size", jax
    0.11.2): every start of such a job compiles."""
    import jax
    if not multi or jax.devices()[0].platform != "cpu":
        return False
    jax.config.update("jax_compilation_cache_dir", None)
    if jax.process_index() == 0:
        print("[server] multi-process on CPU: JAX's persistent compilation cache is off (a cached program's "
              "collectives do not match across gloo processes)", file=sys.stderr)
    return True


def _client():
    from jax._src.distributed import global_state
    if global_state.client is None:
        raise RuntimeError("serving.multihost needs jax.distributed to be initialized (serving.multihost.join)")
    return global_state.client


def _timed_out(e: Exception) -> bool:
    return "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower()


class Shared:
    """A sequence of values, each decided by one process and read by all, in an order every process
    follows (the n-th call on every process is about the same thing). Each value is one key of the
    coordination service's store: `jaxseek/<name>/<n>`."""

    def __init__(self, name: str, timeout_s: float = 120.0, client=None):
        import jax
        self.name, self.timeout_s = name, timeout_s
        self.client = client or _client()
        self.me, self.processes = jax.process_index(), jax.process_count()
        self.count = 0
        self.sent_bytes = 0
        self.seconds = 0.0  # spent in the store (publishing on the writer, waiting on the readers)

    def agree(self, decide, writer: int = 0, wait_forever: bool = False):
        """decide() on `writer`, its value everywhere. A reader waits up to timeout_s (forever when
        wait_forever: a follower between requests) and raises TimeoutError naming the writer."""
        n, self.count = self.count, self.count + 1
        key = f"jaxseek/{self.name}/{n}"
        began = time.perf_counter()
        try:
            if self.me == writer:
                value = decide()
                data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                self.client.key_value_set_bytes(key, data)
                self.sent_bytes += len(data)
                if n >= KEEP:  # (each key is deleted once, by the writer of the key KEEP after it)
                    self.client.key_value_delete(f"jaxseek/{self.name}/{n - KEEP}")
                return value
            deadline = None if wait_forever else time.monotonic() + self.timeout_s
            while True:
                try:
                    return pickle.loads(self.client.blocking_key_value_get_bytes(key, POLL_MS))
                except Exception as e:  # noqa: BLE001 - jax raises its runtime error type for a timeout
                    if not _timed_out(e):
                        raise
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"process {writer} did not publish {key} within {self.timeout_s:.0f} s "
                                       f"(it is stuck or gone)")
        finally:
            self.seconds += time.perf_counter() - began


@dataclasses.dataclass
class StepInputs:
    """What process 0 publishes each time its engine thread acts: the inputs, never the decisions."""
    ops: list  # ("add", request id, prompt ids, SamplingParams) | ("abort", request id), in the order applied
    step: bool  # then call engine.step()
    stop: bool = False  # the server is shutting down: followers exit 0


def apply(engine, ops: list) -> None:
    """Applies process 0's ops to this process's engine, exactly as process 0 applied them (a request
    process 0 refused is refused here too, by the same check, and nothing changes)."""
    for op in ops:
        if op[0] == "add":
            try:
                engine.add_request(op[2], op[3], request_id=op[1])
            except ValueError:
                pass
        else:
            engine.abort(op[1])


def follow(engine, steps: Shared) -> int:
    """A follower's whole life: process 0's step inputs, applied and stepped, until it says stop."""
    import jax
    me = jax.process_index()
    print(f"[server] process {me} of {jax.process_count()}: following process 0's steps", file=sys.stderr)
    n = 0
    while True:
        msg: StepInputs = steps.agree(None, writer=0, wait_forever=True)
        apply(engine, msg.ops)
        if msg.stop:
            s = engine.stats()
            steps_run = engine.counters["prefill_steps"] + engine.counters["decode_steps"]
            print(f"[server] process {me}: stopped by process 0 after {steps_run} steps; kv blocks in use "
                  f"{s['kv_blocks_used']}, running {s['running']}, waiting {s['waiting']}; waited "
                  f"{steps.seconds:.1f} s in all for {n} step messages{disk_written(engine)}", file=sys.stderr)
            return 0
        if msg.step:
            engine.step()
            n += 1


def beat(period_s: float = 0.5) -> threading.Thread:
    """A follower's own heartbeat, a counter in the store: JAX's (10 s) ends the job, this one lets
    process 0 fail /health first and say which process went (`watch`)."""
    import jax
    client, key = _client(), f"jaxseek/alive/{jax.process_index()}"

    def run():
        n = 0
        while True:
            client.key_value_set(key, str(n), allow_overwrite=True)
            n += 1
            time.sleep(period_s)

    thread = threading.Thread(target=run, name="multihost-beat", daemon=True)
    thread.start()
    return thread


def disk_written(engine) -> str:
    """'; disk blocks written N' where the engine has a disk tier (this process's writes)."""
    disk = getattr(engine, "disk", None)
    return "" if disk is None else f"; disk blocks written {disk.stats['written']}"


def watch(server, period_s: float = 0.5, silent_s: float = 5.0, grace_s: float = 1.0) -> threading.Thread:
    """Process 0: a follower whose beat (`beat`) stood still for silent_s fails /health naming it; grace_s later (so a balancer sees the 503) the server
    exits with status 3. A failed step (EngineWorker.fault) does the same."""
    import jax
    client, processes = _client(), list(range(jax.process_count()))
    seen = {p: (None, time.monotonic()) for p in processes[1:]}  # process -> (its last beat, when it changed)

    def check() -> str | None:
        # (not client.get_live_nodes: it waits for every process to call it, a barrier)
        missing, now = [], time.monotonic()
        for p, (last, since) in seen.items():
            try:
                value = client.key_value_try_get(f"jaxseek/alive/{p}")
            except Exception:  # noqa: BLE001 - NOT_FOUND: it has not beaten yet
                value = None
            if value != last:
                seen[p] = (value, now)
            elif now - since > silent_s:
                missing.append(p)
        if missing:
            return f"process {', '.join(map(str, sorted(missing)))} of {len(processes)} stopped (no heartbeat)"
        return server.worker.fault

    def run():
        while True:
            time.sleep(period_s)
            try:
                gone = check()
            except Exception as e:  # noqa: BLE001 - the coordination service itself failed
                gone = f"the coordination service failed ({type(e).__name__}: {str(e)[:200]})"
            if gone:
                server.fault = gone
                log.error("%s: failing /health and exiting", gone)
                print(f"[server] error: {gone}; exiting", file=sys.stderr, flush=True)
                time.sleep(grace_s)
                os._exit(3)

    thread = threading.Thread(target=run, name="multihost-watch", daemon=True)
    thread.start()
    return thread
