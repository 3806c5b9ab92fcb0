"""What the HTTP server tests share: a real uvicorn server on a loopback port in a thread, the real
`openai` client and httpx, Prometheus metrics read back, and the compact deployment they serve."""

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "models" / "jaxseek-tiny"
# One shape bucket per kind, so a module compiles the engine step only a few times.
COMPACT = {"mesh": {"dp": 1}, "serving": {"block_size": 16, "prefill_tokens": [32], "prefill_rows": [8],
                                          "decode_batch": [64], "max_model_len": 128, "kv_cache_mb": 16}}


def write_deployment(path: Path, deployment: dict = COMPACT) -> Path:
    path.write_text(json.dumps(deployment))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, port, app, api_key: str = "x"):
        self.port, self.app = port, app
        self.base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {api_key}"}
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=120)
        self.async_client = lambda: openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0,
                                                       timeout=120)
        self.http = httpx.Client(base_url=self.base, timeout=120, headers=headers)

    def metrics(self) -> dict:
        r = self.http.get("/metrics")
        assert r.status_code == 200
        out = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def value(metrics: dict, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


@contextlib.contextmanager
def serving(app, api_key: str = "x"):
    """Runs the ASGI app under uvicorn on a free loopback port until the block ends."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    running = Running(port, app, api_key)
    try:
        yield running
    finally:
        running.http.close()
        uv.should_exit = True
        thread.join(60)
    assert not thread.is_alive()
    assert not app.state.server.worker.alive  # the engine thread stopped with the server
