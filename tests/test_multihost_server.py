"""The OpenAI server over a multi-process JAX job: real processes on loopback (2 processes x 4 CPU
devices, gloo collectives), the real openai client, compared with the same server on 1 x 8 devices.

One 2 x 4 server serves the module (its start compiles; the test that ends it comes last but one);
the killed-follower test starts a second one without warm-up (it is killed while idle)."""

import asyncio
import importlib.util
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from serving import LLM
from server_util import TINY_MODEL, serving
from serving.server.app import create_app

ROOT = Path(__file__).resolve().parents[1]
# EP over all 8 devices (ranks 0-3 on process 0, 4-7 on process 1), one shape bucket per kind; the
# tests add the disk tier, whose admission and store decisions then cross processes
DEPLOYMENT = json.loads((ROOT / "configs" / "deploy" / "cpu8-compact.json").read_text())
# each spans a full 16-token block (the disk tier stores it); with the text prompt, the chat and the
# stream, 8 requests over 8 ranks (placement: balanced), so ranks of both processes store blocks
PROMPTS = [list(range(3, 40)), list(range(50, 70)), [11] * 18, list(range(20, 37)), list(range(90, 100)) * 2]


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_multihost", ROOT / "scripts" / "launch_multihost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _deployment(path: Path, disk: Path) -> Path:
    dep = json.loads(json.dumps(DEPLOYMENT))
    dep["serving"]["disk_cache_dir"] = str(disk)
    path.write_text(json.dumps(dep))
    return path


class Job:
    """`python -m serving.server` as 2 processes x 4 devices; each process's stderr kept."""

    def __init__(self, deployment: Path, *extra: str):
        launcher = _launcher()
        self.port = launcher.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "serving.server", "--deployment", str(deployment), "--port", str(self.port),
               "--api-key", "k", "--log-level", "warning", *extra]  # (compiles: multihost.uncached)
        self.procs = launcher.spawn(cmd, 2, 4)
        self.err = [[], []]
        for i, p in enumerate(self.procs):
            threading.Thread(target=lambda p=p, i=i: [self.err[i].append(line) for line in p.stderr],
                             daemon=True).start()
        deadline = time.time() + 600
        while "[server] serving 'jaxseek-tiny'" not in self.stderr(0):
            assert all(p.poll() is None for p in self.procs), self.stderr(0)[-3000:] + self.stderr(1)[-3000:]
            assert time.time() < deadline, "the 2 x 4 server did not start in 600 s"
            time.sleep(0.5)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="k", max_retries=0, timeout=180)
        self.async_client = openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key="k", max_retries=0, timeout=180)

    def stderr(self, i: int) -> str:
        return "".join(self.err[i])

    def end(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tmp_path_factory.mktemp("mh-server")


@pytest.fixture(scope="module")
def job(paths):
    job = Job(_deployment(paths / "dep.json", paths / "disk"))
    yield job
    job.end()


@pytest.fixture(scope="module")
def reference(paths):
    """The same server, 1 process x 8 devices (this one), in a thread."""
    llm = LLM(TINY_MODEL, deployment=str(_deployment(paths / "dep1.json", paths / "disk1")))
    with serving(create_app(llm, "jaxseek-tiny"), api_key="x") as running:
        yield running


async def _requests(client):
    """Concurrent greedy completions (text and token-id prompts), a chat and a stream: (text, token ids)."""
    extra = {"ignore_eos": True, "return_token_ids": True}

    async def complete(prompt):
        r = await client.completions.create(model="jaxseek-tiny", prompt=prompt, max_tokens=8, temperature=0,
                                            extra_body=extra)
        return r.choices[0].text, r.choices[0].token_ids

    async def chat():
        r = await client.chat.completions.create(model="jaxseek-tiny", max_tokens=8, temperature=0, extra_body=extra,
                                                 messages=[{"role": "user", "content": "add 23+45="}])
        return r.choices[0].message.content, r.choices[0].token_ids

    async def stream():
        s = await client.completions.create(model="jaxseek-tiny", prompt=PROMPTS[0][::-1], max_tokens=8, temperature=0,
                                            stream=True, extra_body=extra)
        chunks = [c.choices[0] async for c in s if c.choices]
        return "".join(c.text for c in chunks), sum((c.token_ids for c in chunks), [])
    return await asyncio.gather(*[complete(p) for p in ["add 23+45=", *PROMPTS]], chat(), stream())


def test_two_processes_answer_like_one_under_concurrent_load(job, reference):
    multi = asyncio.run(_requests(job.async_client))
    single = asyncio.run(_requests(reference.async_client()))
    assert multi == single and all(len(ids) == 8 for _, ids in multi), (multi, single)


def _used(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("jaxseek_kv_blocks_used"))


def test_a_dropped_stream_frees_its_blocks(job):
    with httpx.stream("POST", f"{job.base}/v1/completions", headers={"Authorization": "Bearer k"}, timeout=120,
                      json={"model": "jaxseek-tiny", "prompt": PROMPTS[2], "max_tokens": 100, "stream": True,
                            "ignore_eos": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # generating: then the client goes away
    deadline = time.time() + 60
    while _used(job.base) != 0:  # process 0's blocks; the follower's are checked when it stops
        assert time.time() < deadline, "the dropped stream's blocks were not freed"
        time.sleep(0.5)


def test_sigterm_drains_and_stops_every_process(job, paths):
    answer = {}

    def long_request():
        answer["r"] = job.client.completions.create(model="jaxseek-tiny", prompt=[7, 8, 9], max_tokens=60,
                                                    temperature=0, extra_body={"ignore_eos": True})
    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(2)
    job.procs[0].send_signal(signal.SIGTERM)
    t.join(180)
    codes = [p.wait(120) for p in job.procs]
    assert answer["r"].choices[0].finish_reason == "length" and answer["r"].usage.completion_tokens == 60
    assert codes == [0, 0], job.stderr(0)[-2000:] + job.stderr(1)[-2000:]
    # every process ran the same steps and holds no block: the dropped stream's too
    lead = re.search(r"process 0: stopped after (\d+) steps; kv blocks in use (\[.*?\])", job.stderr(0))
    follower = re.search(r"process 1: stopped by process 0 after (\d+) steps; kv blocks in use (\[.*?\])",
                         job.stderr(1))
    assert lead and follower, job.stderr(0)[-2000:] + job.stderr(1)[-2000:]
    assert lead.group(1) == follower.group(1) and int(lead.group(1)) > 60
    assert json.loads(lead.group(2)) == json.loads(follower.group(2)) == [0] * 8
    # the disk tier: each process wrote the blocks of its own ranks (process 0 reading a rank of
    # process 1 raised KeyError in DiskTier.store before), and every file is one of theirs
    written = [int(re.search(r"disk blocks written (\d+)", job.stderr(i)).group(1)) for i in (0, 1)]
    assert written[0] > 0 and written[1] > 0, written
    assert sum(written) == len(list((paths / "disk").glob("*.kvb"))), written


def test_a_killed_follower_fails_health_and_exits_naming_it(paths):
    job = Job(_deployment(paths / "dep.json", paths / "disk"), "--no-warmup")  # idle: nothing to compile
    try:
        assert httpx.get(f"{job.base}/health").status_code == 200
        job.procs[1].kill()
        killed, health = time.time(), []
        while job.procs[0].poll() is None and time.time() - killed < 60:
            try:
                r = httpx.get(f"{job.base}/health", timeout=2)
                health.append((r.status_code, r.json().get("status", "")))
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        code, elapsed = job.procs[0].wait(30), time.time() - killed
    finally:
        job.end()
    assert code == 3 and elapsed < 15, (code, elapsed)
    assert "process 1 of 2 stopped (no heartbeat)" in job.stderr(0), job.stderr(0)[:6000]
    failed = [s for c, s in health if c == 503]
    assert failed and "process 1 of 2 stopped" in failed[0], health  # /health failed before the exit
