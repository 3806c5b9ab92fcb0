"""Soak the HTTP server: N requests on loopback, then check that nothing was lost or leaked.

    python scripts/soak.py --requests 10000 --json        # starts `python -m serving.server` itself
    python scripts/soak.py --url http://127.0.0.1:8000 --server-pid PID --api-key KEY
    python scripts/soak.py --deployment configs/deploy/cpu8-disagg.json \
        --override '{"experts": {"rebalance_interval": 8, "rebalance_threshold": 1.0}}' --json
                                   # live EPLB and KV hand-overs under load (--override: merged into
                                   # each section of the deployment, both slices of a disaggregated one)

The mix (seeded): completions and chat, streamed and not, prompts of 1 to ~100 tokens, max_tokens
1 to 48, EOS honoured or ignored, n of 1 or 2, some with logprobs, penalties or stop strings, some
constrained by a grammar (a regex, a choice, a JSON schema) or calling tools (tool_choice required or
a named function; their finished outputs are checked to follow the grammar); 10% of requests are
client disconnects (a stream left after its first events, or a non-streamed request whose client
gives up after 50 ms), 5% are malformed bodies (bad JSON, a lone surrogate, deep nesting,
out-of-range values, a prompt past the context, malformed or huge schemas, a regex that matches
nothing, an unknown tool).

Every request must end as it was due: a complete answer (finish_reason stop or length, `length`
exactly at max_tokens, a stream that ends in [DONE]), a 4xx with OpenAI's error JSON for a malformed
body, or the abort its client caused. At the end the server must hold no KV blocks and no running or
waiting request, and its resident memory (RSS, from /proc, sampled 4 times a second) must have grown
less than 5%: the median over the last tenth of the run against the median over the tenth after the
first (--rss-baseline: where that window starts). And nothing may compile while it runs: the server's
jaxseek_compilations_total (engine steps) and jaxseek_xla_compilations_total (every XLA compilation
in the process: live EPLB moves, hand-overs, ...) must not move (reported as *_during_run), nor may
jaxseek_engine_errors_total. The report follows the server's counters (compilations, EPLB
rebalances, KV hand-overs, EP overflow retries and steps down, MTP drafts, requests) from /health on
(`counters`: at_health, at_end, during_run; `timeline`: sampled every --sample-s), with the warm-up
the server logged (compilations, seconds; a server this starts).
Bounded in time: --deadline-s for the whole run, 120 s a request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"key": {"enum": ["a", "b"]}}, "required": ["key"], "additionalProperties": False}}}
WORDS = ["reverse 12345=", "sort 3141=", "add 57+68=", "reverse 9=", "sort 8675309=", "add 1+2="]
MALFORMED = [  # (body, why) -- each must get a 4xx with an error object, and nothing else
    (b"{not json", "bad JSON"), (b"[1, 2]", "not an object"), (b'{"prompt": "a\\ud800b"}', "lone surrogate"),
    (b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}", "deep nesting"),
    (b'{"prompt": "x", "structured_outputs": {"regex": "(unclosed"}}', "bad regex"),
    (b'{"prompt": "x", "structured_outputs": {"regex": "[^\\\\s\\\\S]"}}', "a regex matching nothing"),
    (b'{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}}',
     "malformed schema"),
    (json.dumps({"prompt": "x", "guided_json": {"type": "object", "properties": {
        f"k{i}": {"type": "integer"} for i in range(20_000)}}}).encode(), "huge schema"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}], '
     b'"tool_choice": {"type": "function", "function": {"name": "g"}}}', "unknown tool"),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens 0"),
    (b'{"prompt": "x", "temperature": -1}', "negative temperature"), (b'{"prompt": "x", "n": 99}', "n too large"),
    (b'{"prompt": "' + b"7" * 5000 + b'"}', "past the context"), (b'{"prompt": [1, 2, 1000000]}', "token id"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role"),
]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def plan(n: int, seed: int, context: int) -> list[dict]:
    """The requests, in order; prompts leave room for max_tokens (and a chat template) in `context`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.05:
            body, why = MALFORMED[rng.randrange(len(MALFORMED))]
            out.append({"kind": "malformed", "raw": body, "why": why, "chat": b"messages" in body})
            continue
        chat = rng.random() < 0.3
        text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 1, 2, 4, 7])))[:context - 64]
        body = {"max_tokens": rng.randint(1, 48), "temperature": rng.choice([0.0, 0.0, 0.8]),
                "seed": rng.randrange(2 ** 31), "ignore_eos": rng.random() < 0.5, "n": rng.choice([1, 1, 1, 2])}
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        extra = rng.random()
        if extra < 0.1:
            body.update({"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2})
        elif extra < 0.2:
            body.update(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)
        elif extra < 0.25:
            body["stop"] = ["1"]
        check = None
        if 0.25 <= extra < 0.35:  # a grammar: its finished outputs must follow it
            check = rng.choice(["regex", "choice", "json"])
            body["structured_outputs"] = {"regex": {"regex": "[0-9]{1,6}"}, "choice": {"choice": ["yes", "no"]},
                                          "json": {"json": SCHEMA}}[check]
        elif 0.35 <= extra < 0.45 and chat:  # tools, called through a grammar
            check = "tool"
            body.update(tools=[TOOL], tool_choice=rng.choice(
                ["required", {"type": "function", "function": {"name": "lookup"}}]))
        stream = rng.random() < 0.5
        body["stream"] = stream
        kind = "disconnect" if r < 0.15 else "normal"
        out.append({"kind": kind, "body": body, "chat": chat, "check": check})
    return out


async def one(client, item: dict, model: str) -> str:
    """Runs one planned request; returns "ok", or what went wrong."""
    path = "/v1/chat/completions" if item["chat"] else "/v1/completions"
    if item["kind"] == "malformed":
        r = await client.post(path, content=item["raw"], headers={"Content-Type": "application/json"})
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        return "ok" if 400 <= r.status_code < 500 and err.get("message") else f"{item['why']}: {r.status_code}"
    body = {**item["body"], "model": model}
    if item["kind"] == "disconnect":
        if body["stream"]:
            async with client.stream("POST", path, json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # leave after the first event: the connection closes
            return "ok"
        try:
            await client.post(path, json=body, timeout=0.05)
        except Exception:  # noqa: BLE001 - the client giving up is the point
            pass
        return "ok"
    if not body["stream"]:
        r = await client.post(path, json=body)
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        out = r.json()
        finishes = [c["finish_reason"] for c in out["choices"]]
        tokens = out["usage"]["completion_tokens"]
        n = len(out["choices"])
        for c in out["choices"]:
            if item["check"] and c["finish_reason"] in ("stop", "tool_calls") and not follows(item["check"], c):
                return f"{item['check']} output does not follow its grammar: {c}"
    else:
        finishes, tokens, done, n = {}, 0, False, 0
        async with client.stream("POST", path, json={**body, "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return f"stream error: {chunk['error']}"
                    for c in chunk["choices"]:
                        if c.get("finish_reason"):
                            finishes[c["index"]] = c["finish_reason"]
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        if not done:
            return "stream without [DONE]"
        n, finishes = len(finishes), list(finishes.values())
    if n != body["n"] or any(f not in ("stop", "length", "tool_calls") for f in finishes):
        return f"finish reasons {finishes} for n={body['n']}"
    if all(f == "length" for f in finishes) and tokens != body["max_tokens"] * n:
        return f"{tokens} tokens at finish 'length', asked {body['max_tokens']} x {n}"
    return "ok"


def follows(check: str, choice: dict) -> bool:
    """Whether a finished constrained output is what its grammar allows."""
    import re
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    try:
        if check == "tool":
            calls = choice["message"]["tool_calls"]
            return bool(calls) and all(c["function"]["name"] == "lookup" and
                                       json.loads(c["function"]["arguments"]) in ({"key": "a"}, {"key": "b"})
                                       for c in calls)
        if check == "json":
            v = json.loads(text)
            return set(v) == {"n", "ok"} and type(v["n"]) is int and type(v["ok"]) is bool
    except (ValueError, TypeError, KeyError):
        return False
    return bool(re.fullmatch("[0-9]{1,6}", text)) if check == "regex" else text in ("yes", "no")


COUNTERS = ("jaxseek_compilations_total", "jaxseek_ep_overflow_retries_total", "jaxseek_xla_compilations_total")
# followed over the run too (errors and cache hits must not move either): what the soak exercised
FOLLOWED = COUNTERS + ("jaxseek_engine_errors_total", "jaxseek_xla_compilation_cache_hits_total",
                       "jaxseek_programs_loaded_total",
                       "jaxseek_eplb_rebalances_total", "jaxseek_kv_handovers_total",
                       "jaxseek_ep_capacity_steps_down_total", "jaxseek_spec_decode_num_drafts_total",
                       "jaxseek_spec_decode_num_accepted_tokens_total", "jaxseek_engine_requests_total",
                       "jaxseek_generation_tokens_total", "jaxseek_preemptions_total")


def counters(metrics: str, names=COUNTERS) -> dict[str, float]:
    """The engine counters the report follows over the run (compilations must not move)."""
    return {name: sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " "))
            for name in names}


def followed(metrics: str) -> dict[str, float]:
    return {k.removeprefix("jaxseek_").removesuffix("_total"): v for k, v in counters(metrics, FOLLOWED).items()}


async def run(args, pid: int | None) -> dict:
    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=args.url, timeout=120, headers=headers, limits=limits) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        model, items = card["id"], plan(args.requests, args.seed, card["max_model_len"])
        sem, results, samples = asyncio.Semaphore(args.concurrency), [None] * len(items), []

        async def sample_rss():  # (answered so far, RSS): medians over windows damp the allocator's swings
            while pid:
                samples.append((sum(r is not None for r in results), rss_bytes(pid)))
                await asyncio.sleep(0.25)

        async def sample_counters():  # the server's counters while the load runs (must stay flat: compilations)
            while True:
                await asyncio.sleep(args.sample_s)
                timeline.append({"s": round(time.perf_counter() - start, 1), "answered": sum(r is not None for r in results),
                                 **followed((await client.get("/metrics")).text)})

        async def guarded(i: int, item: dict):
            async with sem:
                try:
                    results[i] = await one(client, item, model)
                except Exception as e:  # noqa: BLE001 - a transport error on a normal request is a loss
                    results[i] = f"{type(e).__name__}: {e}"
                done = sum(r is not None for r in results)
                if not args.json and done % 500 == 0:
                    print(f"[soak] {done}/{len(items)}", file=sys.stderr, flush=True)

        # a server warming up in the background compiles until its last program is ready (its /health
        # says how far): the run starts after that, since nothing may compile while it runs
        waited = time.perf_counter()
        while not (await client.get("/health")).json().get("warmup", {}).get("done", True):
            if time.perf_counter() - waited > args.deadline_s:
                raise SystemExit(f"the server's background warm-up did not finish in {args.deadline_s} s")
            await asyncio.sleep(0.5)
        first = (await client.get("/metrics")).text
        before, timeline = counters(first), [{"s": 0.0, "answered": 0, **followed(first)}]
        start = time.perf_counter()
        sampler, counter_sampler = asyncio.create_task(sample_rss()), asyncio.create_task(sample_counters())
        await asyncio.wait_for(asyncio.gather(*(guarded(i, it) for i, it in enumerate(items))), args.deadline_s)
        elapsed = time.perf_counter() - start
        sampler.cancel()
        counter_sampler.cancel()
        # aborts land between engine steps: give the engine a moment to settle
        for _ in range(100):
            metrics = (await client.get("/metrics")).text
            used = sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("jaxseek_kv_blocks_used"))
            running = [float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith(("jaxseek_requests_running ", "jaxseek_requests_waiting "))]
            if used == 0 and not any(running):
                break
            await asyncio.sleep(0.1)
    failures = [(items[i]["kind"], r) for i, r in enumerate(results) if r != "ok"]
    kinds = {k: sum(it["kind"] == k for it in items) for k in ("normal", "disconnect", "malformed")}
    report = {"requests": len(items), "by_kind": kinds, "lost": len(failures), "failures": failures[:20],
              "elapsed_s": round(elapsed, 1), "requests_per_s": round(len(items) / elapsed, 2),
              "kv_blocks_used_at_end": used, "running_or_waiting_at_end": sum(running),
              "compilations_during_run": counters(metrics)[COUNTERS[0]] - before[COUNTERS[0]],
              "ep_overflow_retries_during_run": counters(metrics)[COUNTERS[1]] - before[COUNTERS[1]],
              # every XLA compilation in the server process (engine steps, expert moves, hand-overs)
              "xla_compilations_during_run": counters(metrics)[COUNTERS[2]] - before[COUNTERS[2]]}
    end = followed(metrics)
    timeline.append({"s": round(time.perf_counter() - start, 1), "answered": len(items), **end})
    report["counters"] = {k: {"at_health": timeline[0][k], "at_end": v, "during_run": v - timeline[0][k]}
                          for k, v in end.items()}
    report["timeline"] = timeline
    report["engine_errors_during_run"] = report["counters"]["engine_errors"]["during_run"]
    # a program taken from the persistent cache is not counted as a compilation, but was still built
    report["xla_cache_hits_during_run"] = report["counters"]["xla_compilation_cache_hits"]["during_run"]
    if pid:
        n, b = len(items), args.rss_baseline
        start_mb = np.median([r for d, r in samples if b * n <= d < (b + 0.1) * n] or [samples[0][1]]) / 2 ** 20
        end_mb = np.median([r for d, r in samples if d >= 0.9 * n] + [rss_bytes(pid)]) / 2 ** 20
        report.update(rss_start_mb=round(float(start_mb), 1), rss_end_mb=round(float(end_mb), 1),
                      rss_growth=round(float(end_mb / start_mb - 1), 4))
    report["ok"] = (report["lost"] == 0 and used == 0 and not any(running)
                    and report.get("rss_growth", 0) < 0.05
                    # serving after warm-up compiles nothing
                    and report["compilations_during_run"] == 0 and report["xla_compilations_during_run"] == 0
                    and report["engine_errors_during_run"] == 0 and report["xla_cache_hits_during_run"] == 0)
    return report


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`, key by key (nested objects merged, other values replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def overridden(path: str, override: dict) -> tuple[Path, dict]:
    """The deployment at `path` with `override` merged into each section (both slices of a
    disaggregated one), written beside the run's temporary files -> (its path, its JSON)."""
    import tempfile
    raw = json.loads(Path(path).read_text())
    for role in ("prefill", "decode"):
        if role in raw:
            raw[role] = merge(raw[role], override)
    if "prefill" not in raw:
        raw = merge(raw, override)
    out = Path(tempfile.mkdtemp(prefix="soak-")) / Path(path).name
    out.write_text(json.dumps(raw))
    return out, raw


def start_server(args) -> tuple[subprocess.Popen, Path]:
    """-> the server process and the file its stderr goes to (read for its warm-up line)."""
    import tempfile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "serving.server", "--port", str(port), "--log-level", "warning"]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--deployment", str(args.deployment)] if args.deployment else []
    log = Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
    with log.open("w") as err:  # a file, not a pipe: a long run's output never blocks the server
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=err, text=True, start_new_session=True)
    args.url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.time() + args.startup_timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-4000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit("the server did not come up in time")
        try:
            if httpx.get(f"{args.url}/health", timeout=2).status_code == 200:
                return proc, log
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def startup(log: Path) -> dict:
    """The server's own start-up lines (warm-up compilations and seconds, start to serving)."""
    import re
    text = log.read_text()
    out = {}
    warm = re.search(r"warm-up: (\d+) compilations, (\d+) programs loaded in ([\d.]+)s", text)
    if warm:
        out.update(warmup_compilations=int(warm[1]), warmup_programs_loaded=int(warm[2]), warmup_s=float(warm[3]))
    xla = re.search(r"XLA compilations in the process: (\d+) before, (\d+) after, (\d+) programs from the cache", text)
    if xla:
        out.update(xla_compilations_before_warmup=int(xla[1]), xla_compilations_after_warmup=int(xla[2]),
                   xla_cache_hits_after_warmup=int(xla[3]))
    started = re.search(r"started in ([\d.]+)s", text)
    if started:
        out["started_s"] = float(started[1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--server-pid", type=int, help="its process id, for the RSS check (with --url)")
    ap.add_argument("--api-key", default=os.environ.get("JAXSEEK_API_KEY"))
    ap.add_argument("--model", help="checkpoint for the server this starts (default: the embedded tiny model)")
    ap.add_argument("--deployment", help="deployment for the server this starts (default: every device)")
    ap.add_argument("--override", type=json.loads, default=None,
                    help="JSON merged into each section of --deployment (both slices of a disaggregated one), "
                         "e.g. '{\"experts\": {\"rebalance_interval\": 8}}'")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples of the server's counters")
    ap.add_argument("--deadline-s", type=float, default=3600.0, help="the whole run must end within this")
    ap.add_argument("--rss-baseline", type=float, default=0.1,
                    help="fraction of the requests after which the server's RSS is the baseline")
    ap.add_argument("--startup-timeout-s", type=float, default=900.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    effective = None
    if args.override is not None:
        if not args.deployment or args.url:
            ap.error("--override needs --deployment (a server this starts)")
        args.deployment, effective = overridden(args.deployment, args.override)
    proc, log = (None, None) if args.url else start_server(args)
    pid = args.server_pid or (proc.pid if proc else None)
    try:
        report = asyncio.run(run(args, pid))
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    report.update(concurrency=args.concurrency, seed=args.seed)
    if log is not None:
        report["startup"] = startup(log)
    if effective is not None:
        report["deployment"] = effective
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:28s} {v}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
