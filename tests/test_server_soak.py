"""The real command line (`python -m serving.server --model models/jaxseek-tiny`, a subprocess) under
the clients users point at it: a short run of scripts/soak.py (mixed lengths, streams, client
disconnects, malformed bodies; nothing lost, no KV block leaked, RSS flat) and guidellm's
concurrent benchmark (every request completed with the output length it asked for)."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from server_util import ROOT, free_port, write_deployment


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    deployment = write_deployment(tmp_path_factory.mktemp("soak") / "deployment.json")
    port = free_port()
    # --model as users type it: a relative path, served under that name (vLLM's rule)
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--model", "models/jaxseek-tiny", "--deployment",
                             str(deployment), "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the server did not come up"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    yield proc, base
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_short_soak(server):
    proc, base = server
    out = subprocess.run([sys.executable, "scripts/soak.py", "--url", base, "--server-pid", str(proc.pid),
                          "--requests", "160", "--concurrency", "16", "--deadline-s", "300", "--rss-baseline", "0.25",
                          "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["by_kind"]["disconnect"] > 0 and report["by_kind"]["malformed"] > 0
    assert report["lost"] == 0, report["failures"]
    assert report["kv_blocks_used_at_end"] == 0 and report["running_or_waiting_at_end"] == 0
    assert report["rss_growth"] < 0.05, report
    assert out.returncode == 0 and report["ok"]


def test_guidellm_concurrent_run(server, tmp_path):
    """guidellm (the load client vLLM users run) with its concurrent profile: it finds the model
    and its tokenizer from the served name, and every request comes back with the asked length."""
    _, base = server
    result = tmp_path / "guidellm.json"
    cmd = [sys.executable, "-m", "guidellm", "run", "--backend", f"kind=openai_http,target={base}",
           "--profile", "kind=concurrent,streams=4", "--constraint", "kind=max_requests,count=8",
           "--data", "kind=synthetic_text,prompt_tokens=24,output_tokens=12",
           "--output", f"kind=json,path={result}", "--disable-console-interactive"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(result.read_text())
    bench = report["benchmarks"][0]
    requests = bench["requests"]
    assert len(requests["successful"]) == 8 and not requests["errored"] and not requests["incomplete"]
    for r in requests["successful"]:
        assert r["output_tokens"] == 12, r
