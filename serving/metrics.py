"""Prometheus metrics of the HTTP server (serving/server/), in a private CollectorRegistry per server.

Two kinds of numbers:
- observed by the server as requests come and go (HTTP requests by endpoint and status, finish
  reasons, prompt tokens by prefix-cache hit / miss, latency histograms): prometheus_client
  Counters and Histograms, updated from the event loop or the engine thread (they are thread-safe);
- owned by the engine (token and step counters, running / waiting requests, KV blocks per dp rank,
  expert loads, compilations): read by `engine_snapshot(engine)` *in the engine thread* (the engine
  is not thread-safe, and its expert-load array is donated to every step) and exposed at scrape time
  by `EngineCollector` from the latest snapshot.

The list of metrics, with their meaning, is in docs/SERVER.md.
"""

from __future__ import annotations

import math

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "jaxseek"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


def imbalance(load: np.ndarray) -> float:
    """max / mean of a load vector (1.0: perfectly even); NaN while nothing was routed."""
    load = np.asarray(load, np.float64)
    mean = load.mean() if load.size else 0.0
    return float(load.max() / mean) if mean > 0 else math.nan


def engine_snapshot(engine) -> dict:
    """What the collector exposes, read from the engine. Call it only in the thread that owns the engine."""
    from serving.stats import xla_cache_hits
    stats = engine.stats()
    load = np.asarray(engine.expert_load)  # [MoE layers, physical expert slots], summed since the last rebalance
    first_moe = engine.net.config.num_hidden_layers - load.shape[0] if load.ndim == 2 else 0
    return {
        "stats": stats, "xla_cache_hits": xla_cache_hits(), "programs_loaded": engine.programs_loaded,
        "expert_imbalance": imbalance(load.sum(0)) if load.size else None,
        "expert_imbalance_per_layer": ({first_moe + i: imbalance(row) for i, row in enumerate(load)}
                                       if load.size else {}),
    }


class EngineCollector:
    """Exposes the latest engine snapshot (set by the server just before each scrape)."""

    def __init__(self):
        self.snapshot: dict | None = None

    def describe(self):
        return []  # no fixed list: the families appear once there is a snapshot

    def collect(self):
        snap = self.snapshot
        if snap is None:
            return
        s = snap["stats"]

        def counter(name, doc, value, labels=None):
            fam = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels or {}))
            fam.add_metric(list((labels or {}).values()), value)
            return fam

        def gauge(name, doc, value):
            fam = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
            fam.add_metric([], value)
            return fam

        yield counter("prompt_tokens", "Prompt tokens of the requests the engine accepted.", s["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated (sampled) by the engine.", s["generated_tokens"])
        yield counter("engine_requests", "Requests the engine accepted.", s["requests"])
        steps = CounterMetricFamily(f"{PREFIX}_engine_steps", "Engine steps by kind.", labels=["kind"])
        seconds = CounterMetricFamily(f"{PREFIX}_engine_step_seconds", "Wall time of engine steps by kind.",
                                      labels=["kind"])
        for kind in ("prefill", "decode"):
            steps.add_metric([kind], s[f"{kind}_steps"])
            seconds.add_metric([kind], s[f"{kind}_s"])
        yield steps
        yield seconds
        yield counter("preemptions", "Running requests preempted (recompute) when a rank's KV pool had no block "
                      "for a running request's next token (vLLM's num_preemptions).", s["preemptions"])
        yield gauge("requests_running", "Requests holding KV blocks (in prefill or decode).", s["running"])
        yield gauge("requests_waiting", "Requests queued for admission.", s["waiting"])
        used = GaugeMetricFamily(f"{PREFIX}_kv_blocks_used", "KV-cache blocks referenced by requests, per dp rank.",
                                 labels=["dp_rank"])
        cached = GaugeMetricFamily(f"{PREFIX}_kv_blocks_cached",
                                   "Free KV-cache blocks still holding a prefix-cache entry, per dp rank.",
                                   labels=["dp_rank"])
        total = GaugeMetricFamily(f"{PREFIX}_kv_blocks_total", "KV-cache blocks per dp rank.", labels=["dp_rank"])
        for rank, (u, c) in enumerate(zip(s["kv_blocks_used"], s["kv_blocks_cached"])):
            used.add_metric([str(rank)], u)
            cached.add_metric([str(rank)], c)
            total.add_metric([str(rank)], s["kv_blocks_total_per_rank"])
        yield used
        yield cached
        yield total
        yield gauge("parameter_bytes", "Bytes of the model's parameters on device, each array counted once "
                    "(FP8 weights: 1 byte each plus their scales).", s["parameter_bytes"])
        yield gauge("parameter_bytes_per_device", "Bytes of parameters on the device holding the most.",
                    s["parameter_bytes_per_device"])
        yield counter("compilations", "XLA compilations of the engine step (shape buckets, EP capacity levels).",
                      s["compilations"])
        yield counter("xla_compilations", "XLA compilations in the server process, whatever asked for them (engine "
                      "steps, expert moves, KV hand-overs); flat after warm-up.", s["xla_compilations"])
        if s.get("warmup"):  # programs that run without compiling (the rest compile in the background)
            yield gauge("warmup_programs_ready", "Engine-step programs (shape bucket x EP capacity level) compiled or "
                        "loaded: a batch runs the smallest ready shape that holds it.", s["warmup"]["programs_ready"])
            yield gauge("warmup_programs", "Engine-step programs warm-up makes ready.", s["warmup"]["programs"])
        yield counter("xla_compilation_cache_hits", "Programs the server process took from JAX's persistent "
                      "compilation cache instead of compiling them; flat after warm-up.", snap.get("xla_cache_hits", 0))
        yield counter("programs_loaded", "Compiled engine steps loaded from disk instead of compiled (saved steps: "
                      "warm-up, and a raised EP capacity level's when an overflow needs it).",
                      snap.get("programs_loaded", 0))
        # speculative decoding, vLLM's names (vllm:spec_decode_*) under our prefix
        yield counter("spec_decode_num_drafts", "Verify windows of MTP drafts run (one per request and step).",
                      s["spec_drafts"])
        yield counter("spec_decode_num_draft_tokens", "MTP draft tokens verified.", s["spec_draft_tokens"])
        yield counter("spec_decode_num_accepted_tokens", "MTP draft tokens accepted.", s["spec_accepted_tokens"])
        if s.get("handover"):  # a disaggregated deployment
            yield counter("kv_handovers", "Requests whose KV blocks the prefill slice handed to a decode rank.",
                          s["handover"]["requests"])
        yield counter("ep_capacity_steps_down", "EP capacity levels stepped back down after a window without "
                      "overflow.", s["ep_capacity_steps_down"])
        yield counter("ep_overflow_retries",
                      "Engine steps re-run at a larger EP capacity bucket because rows overflowed.",
                      s["ep_overflow_retries"])
        if snap["expert_imbalance"] is not None:
            yield gauge("expert_load_imbalance",
                        "max / mean tokens per physical expert slot, summed over MoE layers (since start or "
                        "the last rebalance); NaN until a token is routed.", snap["expert_imbalance"])
            per_layer = GaugeMetricFamily(f"{PREFIX}_expert_load_imbalance_per_layer",
                                          "max / mean tokens per physical expert slot, per MoE layer.",
                                          labels=["layer"])
            for layer, value in snap["expert_imbalance_per_layer"].items():
                per_layer.add_metric([str(layer)], value)
            yield per_layer
        eplb = s.get("eplb") or {}
        if "balancedness" in eplb:
            yield gauge("ep_rank_load_imbalance",
                        "EP only: max / mean tokens per EP rank, mean over MoE layers (EPLB's balancedness).",
                        eplb["balancedness"])
            yield counter("eplb_rebalances", "Live EPLB re-placements of the experts.", eplb["rebalances"])


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by endpoint and status code.",
                                     ["endpoint", "status"], registry=r)
        self.finished = Counter(f"{PREFIX}_requests_finished",
                                "Generation requests (choices) finished, by reason: stop, length, abort "
                                "(client went away), error.", ["reason"], registry=r)
        self.prompt_cache = Counter(f"{PREFIX}_prompt_tokens_by_cache",
                                    "Prompt tokens of prefilled requests: hit = found in the prefix cache, "
                                    "miss = computed.", ["cache"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "From the HTTP request's arrival to its first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Mean time between a request's output tokens after the first.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds",
                             "From the HTTP request's arrival to its last token.", buckets=E2E_BUCKETS, registry=r)
        self.engine_errors = Counter(f"{PREFIX}_engine_errors", "Engine steps that raised (their requests failed).",
                                     registry=r)
        self.engine = EngineCollector()
        r.register(self.engine)
        for cache in ("hit", "miss"):  # both series exist from the start
            self.prompt_cache.labels(cache=cache)

    def render(self, snapshot: dict | None) -> bytes:
        self.engine.snapshot = snapshot
        return generate_latest(self.registry)
