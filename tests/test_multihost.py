"""Multi-host: real processes on localhost, one multi-controller JAX job (gloo collectives)."""

import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serving import LLM, SamplingParams
from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "configs" / "deploy" / "cpu8.json"  # EP8 over all 8 devices
DISAGG = ROOT / "configs" / "deploy" / "cpu8-disagg.json"  # prefill on process 0's devices, decode on 1's
PROMPTS = ["5,17,42,7", "9,3", "60,61,62,63,64,65"]


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_multihost", ROOT / "scripts" / "launch_multihost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generate_cmd(model, *extra, deployment=DEPLOYMENT):
    cmd = [sys.executable, "-m", "serving.generate", "--model", str(model), "--deployment", str(deployment),
           "--max-tokens", "6", "--json"]
    for p in PROMPTS:
        cmd += ["--prompt-ids", p]
    return cmd + list(extra)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("multihost")
    save_tiny(path, 31)
    return path


@pytest.mark.parametrize("deployment,quantization", [(DEPLOYMENT, "fp8"), (DISAGG, "none")],
                         ids=["ep8-fp8", "disaggregated"])
def test_two_processes_of_four_devices_match_one_process_of_eight(model, deployment, quantization):
    cmd = _generate_cmd(model, "--quantization", quantization, deployment=deployment)
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch_multihost.py"), "--local-processes", "2",
                          "--cpu-devices-per-process", "4", "--", *cmd],
                         cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    multi = [line["token_ids"] for line in lines if "token_ids" in line]
    single = LLM(model, deployment=deployment, quantization=quantization).generate(
        [[int(t) for t in p.split(",")] for p in PROMPTS], SamplingParams(max_tokens=6))
    assert multi == [o.token_ids for o in single] and len(multi) == 3 and all(multi)
    if deployment == DISAGG:  # the KV of every prompt crossed from process 0's devices to process 1's
        stats = next(line["stats"] for line in lines if "stats" in line)
        assert stats["handover"]["requests"] == 3 and stats["prefill"]["devices"] == stats["decode"]["devices"] == 4


def test_a_killed_process_makes_the_other_fail_fast(model):
    procs = _launcher().spawn(_generate_cmd(model, "--max-tokens", "400"), 2, 4)
    err0, ready = [], threading.Event()

    def read():
        for line in procs[0].stderr:
            err0.append(line)
            if "loading the model" in line:  # both processes have joined the job
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=lambda: procs[1].stderr.read(), daemon=True).start()
    try:
        assert ready.wait(180), "".join(err0)[-2000:]
        time.sleep(5)
        procs[1].kill()
        killed_at = time.time()
        code = procs[0].wait(timeout=120)
        elapsed = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert code != 0
    assert elapsed < 60, f"took {elapsed:.0f}s"
    # JAX's coordination service names the lost process: "Task 1 heartbeat timeout", or "tasks are
    # unhealthy (stopped sending heartbeats):" followed by its id
    text = "".join(err0)
    assert re.search(r"[Tt]ask[: ]1\b|stopped sending heartbeats\):\s*\n\s*(\S*task:)?1\b", text), text[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--num-processes", "2", "--process-id", "5", "--coordinator", "127.0.0.1:9"],
     "process id 5 is outside [0, 2)"),
    (["--num-processes", "2", "--process-id", "1"], "a multi-process launch needs --coordinator"),
    (["--num-processes", "2", "--process-id", "1", "--coordinator", "127.0.0.1:{port}", "--init-timeout", "3"],
     "could not join the coordinator at 127.0.0.1:"),
])
def test_bad_launch_input(model, args, message):
    args = [a.replace("{port}", str(_launcher().free_port())) for a in args]
    run = subprocess.run(_generate_cmd(model, *args), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]


def test_device_count_not_matching_the_deployment(model):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch_multihost.py"), "--local-processes", "2",
                          "--cpu-devices-per-process", "2", "--", *_generate_cmd(model)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "mesh dp=8 x tp=1 needs 8 devices, only 4 available" in run.stderr
    assert "[launch] failed: process" in run.stderr
