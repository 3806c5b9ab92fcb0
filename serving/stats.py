"""Engine statistics: the counters a step updates, device-seconds held through resizes, and the
figures users, /metrics and the cost report read (serving/economics.py, docs/ECONOMICS.md)."""

from __future__ import annotations

import collections
import time

import jax
import numpy as np

COUNTERS = ("requests", "finished", "rejected", "prompt_tokens", "cached_prompt_tokens", "generated_tokens",
            "kv_tokens_read", "prefill_steps", "decode_steps", "prefill_s", "decode_s", "ep_overflow_retries",
            "ep_capacity_steps_down", "disk_cached_prompt_tokens", "resizes",
            # the scheduler: engine steps, those running a decode and a prefill batch, preemptions (recompute)
            "steps", "mixed_steps", "preemptions",
            # speculative decoding (vLLM's names): verify windows, draft tokens in them, drafts accepted
            "spec_drafts", "spec_draft_tokens", "spec_accepted_tokens")


class XlaCompilations:
    """Every XLA compilation this process runs, whatever asked for it (engine steps, EPLB expert
    moves, KV hand-overs and copies, eager ops on a new shape): jax.monitoring's backend-compile
    events less its persistent-cache hits (a program loaded from the cache compiles nothing).
    Listeners are process-wide and cannot be removed, so this is installed once (`xla_compilations`)."""

    COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
    CACHE_HIT = "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.compiles = self.cache_hits = 0
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    def _duration(self, event: str, _secs: float, **_) -> None:
        if event == self.COMPILE:
            self.compiles += 1

    def _event(self, event: str, **_) -> None:
        if event == self.CACHE_HIT:
            self.cache_hits += 1

    @property
    def count(self) -> int:
        return self.compiles - self.cache_hits


_XLA: XlaCompilations | None = None


def xla_compilations() -> int:
    """XLA compilations in this process since the counter was first read (engines read it at start)."""
    return _xla().count


def xla_cache_hits() -> int:
    """Programs this process took from JAX's persistent compilation cache instead of compiling them
    (each still traced and lowered first): flat after warm-up too, where a cache is on."""
    return _xla().cache_hits


def _xla() -> XlaCompilations:
    global _XLA
    if _XLA is None:
        _XLA = XlaCompilations()
    return _XLA


def new_counters() -> dict:
    """One dict shared by the engine's parts (scheduler: requests and tokens; runner: steps)."""
    return {k: 0.0 if k.endswith("_s") else 0 for k in COUNTERS}


class DeviceClock:
    """Device-seconds held since start, through every change of the device count (elastic resize)."""

    def __init__(self, devices: int):
        self.devices, self._before, self._since = devices, 0.0, time.perf_counter()

    def hold(self, devices: int) -> None:
        now = time.perf_counter()
        self._before += (now - self._since) * self.devices
        self.devices, self._since = devices, now

    @property
    def seconds(self) -> float:
        return self._before + (time.perf_counter() - self._since) * self.devices


def summarize(counters: dict, finished, gpu_seconds: float) -> dict:
    """Counters -> the figures users and the cost report read (also over several engines' counters)."""
    c = dict(counters)
    done = [r for r in finished if r.first_token_at]
    ttft = [r.first_token_at - r.arrival for r in done]
    speed = [(len(r.output) - 1) / (r.finished_at - r.first_token_at) for r in done
             if len(r.output) > 1 and r.finished_at > r.first_token_at]
    c.update(
        cache_hit_rate=c["cached_prompt_tokens"] / max(c["prompt_tokens"], 1),
        input_tokens_cache_hit=c["cached_prompt_tokens"],
        input_tokens_cache_miss=c["prompt_tokens"] - c["cached_prompt_tokens"],
        average_kv_length_per_output_token=c["kv_tokens_read"] / max(c["generated_tokens"], 1),
        gpu_seconds=gpu_seconds,
        prefill_tokens_per_s=(c["prompt_tokens"] - c["cached_prompt_tokens"]) / max(c["prefill_s"], 1e-9),
        decode_tokens_per_s=c["generated_tokens"] / max(c["decode_s"], 1e-9),
        ttft_s=percentiles(ttft), tokens_per_s_per_user=percentiles(speed),
        speculative=speculative(c),
    )
    return c


def speculative(c: dict) -> dict:
    """MTP speculative decoding: the share of draft tokens accepted, and tokens per verify window of
    a request (1 + the drafts accepted: 1.0 without speculation)."""
    drafts, tokens, accepted = c["spec_drafts"], c["spec_draft_tokens"], c["spec_accepted_tokens"]
    return {"acceptance_rate": accepted / max(tokens, 1), "tokens_per_step": (drafts + accepted) / drafts if drafts else 1.0,
            "drafts": drafts, "draft_tokens": tokens, "accepted": accepted}


def parameter_bytes(net) -> dict:
    """The weights on device: `parameter_bytes` counts each array once (one copy of a replicated
    weight; every physical expert slot), `parameter_bytes_per_device` the most any device holds."""
    per_device: collections.Counter = collections.Counter()
    for a in jax.tree.leaves(net.held_weights()):
        for shard in a.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
    return {"parameter_bytes": net.parameter_bytes, "parameter_bytes_per_device": max(per_device.values(), default=0)}


def statistics_record(stats: dict, gpus_per_node: int = 8) -> dict:
    """Engine statistics -> one record of the statistics file scripts/cost_report.py reads."""
    return {"window_hours": max(stats["gpu_seconds"] / stats["devices"] / 3600, 1e-9), "gpus_per_node": gpus_per_node,
            "gpu_seconds": stats["gpu_seconds"], "input_tokens_cache_hit": stats["input_tokens_cache_hit"],
            "input_tokens_cache_miss": stats["input_tokens_cache_miss"], "output_tokens": stats["generated_tokens"]}


def percentiles(values) -> dict:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}
