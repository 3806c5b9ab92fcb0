"""The engine: requests in, a step at a time, events out. It wires four parts together, each in a
module of its own: the scheduler owns the requests (serving/scheduler.py), the model runner owns
the device side (serving/runner.py), live EPLB moves experts (serving/live_eplb.py), elastic
capacity resizes (serving/elastic.py); statistics in serving/stats.py. A step:

    batches = scheduler.schedule()                 # KV on demand, preemption, admission: the decode
                                                   # rows, then prefill chunks within the token budget
    outs = [runner.dispatch(runner.pack(b)) for b in batches]  # one jitted step each, not waited for
    hosts = finish_steps(runner, outs)             # the device->host reads; overflow re-runs
    events = [scheduler.update_from_output(b, *unpack(h)) for b, h in ...]  # tokens, logprobs

With async scheduling (the default) a step dispatches step N + 1 before it reads and lands step N:
N + 1's rows take N's tokens on the device (serving/input_batch.py), the host learns them one step
late (Engine.step says where a step runs synchronously instead).
"""

from __future__ import annotations

import random
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from serving.disk_tier import DiskTier
from serving.elastic import Elastic
from serving.live_eplb import LiveEPLB
from serving.request import Event, Request, validate_prompt
from serving.runner import Launched, ModelRunner, finish_steps
from serving.sampling import SamplingParams, unpack
from serving.scheduler import ROLES, Scheduler
from serving.structured import Grammars
from serving.stats import DeviceClock, new_counters, parameter_bytes, statistics_record, summarize, xla_compilations


def draft_tokens(net, deployment) -> int:
    """k, the MTP draft tokens per request and step, from the deployment's `speculative` section:
    "auto" (the default) drafts 1 where the checkpoint has MTP weights (as DeepSeek serves), None none."""
    spec = deployment.speculative
    if spec == "auto":
        return 1 if net.mtp is not None else 0
    if spec is None:
        return 0
    if net.mtp is None:
        raise ValueError(f"{deployment.source}: speculative method 'mtp' needs the checkpoint's MTP weights, and "
                         f"this checkpoint has none (num_nextn_predict_layers = 0); drop the speculative section")
    return spec.num_tokens


def build_engine(path, deployment, dtype, devices=None, role: str = "mixed", quantization=None) -> "Engine":
    """One engine: the checkpoint loaded onto the deployment's mesh (over `devices`, default all).
    quantization: fp8 | none (default: the deployment's, else by the checkpoint and platform)."""
    from model import DeepseekV3
    from sharding.deployment import resolve
    deployment, mesh = resolve(deployment, deployment.make_mesh(devices))
    net = DeepseekV3.from_pretrained(path, dtype=dtype, mesh=mesh, deployment=deployment, quantization=quantization)
    tokenizer = Path(path) / "tokenizer.json"
    return Engine(net, deployment, mesh, role, tokenizer if tokenizer.is_file() else None)


class Engine:
    def __init__(self, net, deployment, mesh=None, role: str = "mixed", tokenizer_file=None):
        """deployment: sharding.deployment.Deployment (its serving, dispatch and experts sections).
        role: mixed (prefill and decode here), prefill (finished prompts wait in `outbox` for a
        decode slice, serving/disagg.py) or decode (takes prefilled requests through `receive`).
        tokenizer_file: the checkpoint's tokenizer.json, which structured outputs compile against."""
        if role not in ROLES:
            raise ValueError(f"engine role {role!r} is not one of {ROLES}")
        self.net, self.deployment, self.cfg, self.role = net, deployment, deployment.serving, role
        self.counters = new_counters()
        xla_compilations()  # the process-wide compilation counter, listening from now on
        self.drafts = draft_tokens(net, deployment)
        self.runner = ModelRunner(net, deployment, mesh, self.counters, role, self.drafts)
        self.context_len = self.runner.context_len
        local = mesh is None or any(d.process_index == jax.process_index() for d in mesh.devices.flat)
        self.disk_tier = DiskTier(self.runner, self.counters) if self.cfg.disk_cache_dir and local else None
        self.disk = self.disk_tier.cache if self.disk_tier else None
        self.scheduler = Scheduler(self.cfg, self.runner.ranks, self.runner.blocks_per_rank,
                                   (self.disk_tier.prefix, self.disk_tier.fetch) if self.disk else None,
                                   max_running=self.runner.blocks_per_rank if role == "prefill" else None,
                                   role=role, eos_token_ids=net.config.eos_token_ids, counters=self.counters,
                                   drafts=self.drafts)
        if self.disk_tier:
            self.scheduler.on_prompt_done = self.disk_tier.store
        # a preempted request's penalty row is rebuilt from its prompt and output when it samples again
        # (and its next token, once read, goes to the device with its recompute)
        self.scheduler.on_preempt = self._preempted
        self.eplb = LiveEPLB(self.runner, deployment) if net.moe_layers is not None else None
        self.elastic = Elastic(self)
        self.started = time.perf_counter()
        self.clock = DeviceClock(1 if mesh is None else mesh.size)
        self.last_step: dict = {}
        self._next_id = 0
        self.grammars = Grammars(tokenizer_file, net.config.vocab_size, tuple(net.config.eos_token_ids))
        self.seeds: random.Random | None = None  # draws the seeds of requests without one (vLLM's --seed)
        self.async_scheduling = self.cfg.async_scheduling
        self._inflight: list[Launched] | None = None  # async scheduling: the step dispatched, not yet read
        self._guided: set[str] = set()  # requests whose grammar or min_tokens needs every token on the host
        self._drained: list[Event] = []  # landed out of turn (before a resize): the next step returns them

    def _preempted(self, req: Request) -> None:
        self.runner.penalties.release(req.id)
        self.runner.inputs.release(req.id)

    # ---- what the runner holds, read by the API, metrics, tests -------------------------------------
    @property
    def mesh(self):
        return self.runner.mesh

    @property
    def ranks(self) -> int:
        return self.runner.ranks

    @property
    def pool(self):
        return self.runner.pool

    @property
    def expert_load(self):
        return self.runner.expert_load

    @property
    def context_buckets(self) -> tuple[int, ...]:
        return self.runner.context_buckets

    @property
    def compilations(self) -> int:
        return self.runner.compilations

    @property
    def programs_loaded(self) -> int:
        return self.runner.programs_loaded

    @property
    def requests(self) -> dict:
        return self.scheduler.requests

    @property
    def outbox(self) -> list:
        return self.scheduler.outbox

    @property
    def resizes(self) -> list[dict]:
        return self.elastic.history

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Validates and queues a request; a bad one raises ValueError naming it, and nothing else changes."""
        rid = request_id or f"req-{self._next_id}"
        self._next_id += 1
        prompt = [int(t) for t in prompt]
        try:
            validate_prompt(prompt, self.net.config.vocab_size, self.context_len, rid)
            try:
                params.check_vocabulary(self.net.config.vocab_size)
            except ValueError as e:
                raise ValueError(f"request {rid}: {e}") from None
            seed = params.seed if params.seed is not None else \
                self.seeds.getrandbits(32) if self.seeds else zlib.crc32(rid.encode())
            req = Request(rid, prompt, params, seed, min(params.max_tokens, self.context_len - len(prompt)))
            if params.needs_mask:
                try:
                    req.guide = self.grammars.guide(params)
                except ValueError as e:
                    raise ValueError(f"request {rid}: structured_outputs: {e}") from None
            self.scheduler.add(req)
            if req.guide is not None:  # steps run synchronously while it runs (Engine.step)
                self._guided.add(rid)
        except ValueError:
            self.counters["rejected"] += 1
            raise
        return req

    def abort(self, request_id: str) -> None:
        """Cancels a request (a client went away): its blocks are freed now."""
        req = self.scheduler.requests.get(request_id)
        if req is not None:
            req.guide = None
        self._guided.discard(request_id)
        self.scheduler.abort(request_id)
        self.runner.penalties.release(request_id)
        self.runner.inputs.release(request_id)  # (a step in flight may still write it: nothing reads it)

    def receive(self, req: Request) -> bool:
        """Decode role: takes a request prefilled elsewhere if a rank has room; the caller then writes
        its KV blocks (serving/disagg.py). False: try again after some requests finish."""
        return self.scheduler.receive(req)

    @property
    def idle(self) -> bool:
        return self.scheduler.idle and self.elastic.pending is None and self._inflight is None and not self._drained

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One engine step. Async scheduling (serving.async_scheduling, the default): schedules and
        dispatches step N + 1, then reads and lands step N, whose events it returns (one step late);
        the device runs N + 1 while the host lands N. Synchronous: step N is dispatched, read and
        landed in one call. A step falls back to synchronous where the host must see every token
        before the next step: MTP drafts (a row's advance is the drafts accepted), a running request
        with a grammar or min_tokens (its next mask follows the token), a prefill slice, a resize."""
        began, (events, self._drained) = time.perf_counter(), (self._drained, [])
        if not self._async_ok():
            events += self.drain()
            launched = self.launch()
            return events + (self.land(launched, self._finish(launched)) if launched else [])
        launched = self.launch()
        previous, self._inflight = self._inflight, launched or None
        if previous is None:
            return events
        outs = [part.out for part in previous]
        hosts = self._finish(previous)
        if launched and any(part.out is not out for part, out in zip(previous, outs)):
            for part in launched:  # it ran after a step that overflowed, and kept nothing: again
                part.out = self.runner.dispatch(part.batch.kind, part.arrays)
        return events + self.land(previous, hosts, began, launched[-1].prepared if launched else began)

    def _finish(self, launched: list[Launched]) -> list[np.ndarray]:
        return finish_steps([self.runner] * len(launched), launched, lambda outs: [np.asarray(o) for o in outs])

    def drain(self) -> list[Event]:
        """Lands the step still in flight (async scheduling), if any: its events."""
        previous, self._inflight = self._inflight, None
        return self.land(previous, self._finish(previous)) if previous else []

    def _async_ok(self) -> bool:
        return (self.async_scheduling and not self.drafts and self.role != "prefill"
                and self.elastic.pending is None and not self._guided)

    # A step in two halves around the read, so a disaggregated deployment spanning processes can
    # launch both slices' steps before reading either (serving/disagg.py).
    def launch(self) -> list[Launched]:
        """Schedules the next step and dispatches its jitted programs without waiting for them: the
        decode batch, then the prefill batch (a mixed step runs both; a role's engine one kind)."""
        start = time.perf_counter()
        if self.elastic.pending is not None:
            self.elastic.advance()
        launched = []
        for batch in self.scheduler.schedule():
            arrays = self.runner.pack(batch, self.requests.__contains__)
            self.scheduler.dispatched(batch)
            prepared = time.perf_counter()
            launched.append(Launched(batch, arrays, self.runner.dispatch(batch.kind, arrays), start, prepared))
        return launched

    def land(self, launched: list[Launched], hosts: list[np.ndarray], began: float | None = None,
             prepared: float | None = None) -> list[Event]:
        """Advances the requests by the step's sampled tokens (hosts: each program's output, read back).
        began, prepared: when this engine step started and had dispatched what it dispatches (default:
        the landed step's own; async scheduling: the next step's, dispatched before this one landed)."""
        start, returned, events = launched[0].start if began is None else began, time.perf_counter(), []
        prepared = launched[-1].prepared if prepared is None else prepared
        for part, host in zip(launched, hosts):
            tokens, accepted, drafts, *logprobs = unpack(host[:-1], self.net.config.vocab_size, self.drafts)
            events += self.scheduler.update_from_output(part.batch, tokens, logprobs, accepted, drafts)
        for e in events:  # a request that leaves this engine gives back its penalty row and token slot
            if e.request.guide is not None:  # the grammar moves by the accepted tokens only
                if e.finished:
                    e.request.guide = None  # (finished requests are kept for stats: not their matchers)
                    self._guided.discard(e.request.id)
                else:
                    e.request.guide.advance(e.new_tokens)
            if e.finished or self.role == "prefill":
                self.runner.penalties.release(e.request.id)
                self.runner.inputs.release(e.request.id)
        self.runner.landed()
        done = time.perf_counter()
        elapsed = done - start
        kinds = [part.batch.kind for part in launched]
        for kind in kinds:  # (a mixed step's time counts for both: each kind's rate over the steps it ran in)
            self.counters[f"{kind}_steps"] += 1
            self.counters[f"{kind}_s"] += elapsed
        self.counters["steps"] += 1
        self.counters["mixed_steps"] += len(kinds) > 1
        # host bookkeeping: building the batches before the jitted calls and advancing requests after them
        self.last_step = {"kind": "mixed" if len(kinds) > 1 else kinds[0], "wall_s": elapsed,
                          "host_s": (prepared - start) + (done - returned)}
        if self.eplb is not None:
            self.eplb.after_step(self.counters["steps"])
        return events

    def warmup(self, background: bool = False) -> int:
        """Compiles every shape bucket this engine's role runs, at every EP capacity level, so serving
        never compiles; returns the number of compilations this took. background: only the shapes
        that hold any batch now, the rest while serving (serving/warmup.py)."""
        kinds = {"mixed": ("prefill", "decode"), "prefill": ("prefill",), "decode": ("decode",)}[self.role]
        compiled = self.runner.warmup(kinds, background)
        if self.eplb is not None:
            self.eplb.warmup()
        self.elastic.warmed_up()  # (a resize to other devices warms those up too: serving/elastic.py)
        return compiled

    # ---- elastic capacity ---------------------------------------------------------------------------
    def resize(self, devices) -> None:
        """Serve on these devices from now on (serving/elastic.py)."""
        self._drained += self.drain()  # (the requests move with every token read)
        self.elastic.resize(devices)

    def resize_dp(self, dp: int, spare: list) -> None:
        """Resize to dp ranks: leaving devices go to `spare`, new ranks come from it (in order)."""
        self._drained += self.drain()
        self.elastic.resize_dp(dp, spare)

    # ---- statistics --------------------------------------------------------------------------------
    @property
    def devices(self) -> int:
        return self.clock.devices

    @property
    def gpu_seconds(self) -> float:
        """Device-seconds held since the engine started, through every resize."""
        return self.clock.seconds

    @property
    def finished(self):
        return self.scheduler.finished

    def statistics_record(self, gpus_per_node: int = 8) -> dict:
        """The window served so far in the statistics-file form scripts/cost_report.py reads
        (serving/economics.py, docs/ECONOMICS.md)."""
        return statistics_record(self.stats(), gpus_per_node)

    def stats(self) -> dict:
        c = summarize(self.counters, self.finished, self.gpu_seconds)
        s, ep = self.scheduler, self.net.ep
        c.update(
            running=sum(len(r) for r in s.running), waiting=len(s.waiting), dp=self.ranks, devices=self.devices,
            kv_blocks_total_per_rank=self.runner.blocks_per_rank, kv_blocks_used=[p.used for p in s.pools],
            kv_blocks_cached=[len(p.evictable) for p in s.pools],
            balance={k: v.summary() for k, v in s.balance.items()},
            disk=self.disk.stats if self.disk else None, resizes=self.resizes, compilations=self.compilations,
            xla_compilations=xla_compilations(),
            ep_capacity_level=None if ep is None else ep.level,
            eplb=self.eplb.stats() if self.eplb is not None else {},
            quantization=self.net.quantization, **parameter_bytes(self.net),
            warmup=self.runner.warming.progress() if self.runner.warming else None,
        )
        c["speculative"]["num_tokens"] = self.drafts
        return c
