"""Elastic capacity: an engine's dp ranks change while it serves, between steps.

Shrinking: the leaving ranks (the last ones) stop taking requests; their requests are placed on the
staying ranks by the decode balancer and their KV blocks copied there; any that find no room finish
where they are, and the resize completes on the step after the leaving ranks empty. Then the
weights and the pool move to the new mesh (ModelRunner.move_to). Growing takes effect at once.

An engine that was warmed up (Engine.warmup: the server's start) warms up each set of devices on
its first visit too (every shape bucket and capacity level, the block copies, the expert move), and
keeps the programs: a resize back to devices served before, and whatever is served there, compiles
nothing. An engine never warmed up compiles on first use, there as everywhere.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from serving.kv_cache import copy_blocks, zero_shard
from sharding.mesh import make_mesh


class Elastic:
    def __init__(self, engine):
        self.engine = engine
        self.pending: list | None = None  # devices of a resize waiting for leaving ranks to empty
        self.history: list[dict] = []
        self.warmed: set[tuple] = set()  # device ids of the meshes Engine.warmup compiled for

    def warmed_up(self) -> None:
        """Engine.warmup compiled the current mesh's programs; and (compiled only) the pool shard a
        grow puts on each device of this process, whichever devices a grow takes later."""
        runner = self.engine.runner
        if runner.mesh is None:
            return
        self.warmed.add(self._ids(runner.mesh.devices.flat))
        L, _, BS, C = runner.pool.shape
        for device in jax.local_devices():
            zero_shard(device, (L, runner.blocks_per_rank, BS, C), runner.pool.dtype, run=False)

    @staticmethod
    def _ids(devices) -> tuple:
        return tuple(d.id for d in devices)

    def resize(self, devices) -> None:
        """Serve on these devices from now on (whole dp ranks: dp x tp devices, the current ranks'
        devices first, in order)."""
        engine, runner = self.engine, self.engine.runner
        devices = list(devices)
        old = list(runner.mesh.devices.flat)
        per_rank = len(old) // runner.ranks  # devices of one dp rank (tp)
        keep = min(len(devices), len(old))
        if len(devices) % per_rank or not devices or devices[:keep] != old[:keep] or len(set(devices)) < len(devices):
            raise ValueError(f"resize to {[d.id for d in devices]}: give whole ranks of tp={per_rank} devices, "
                             f"starting with the current ones in order {[d.id for d in old]}")
        dp = len(devices) // per_rank
        if runner.net.moe_layers is not None and runner.net.n_physical_experts % len(devices):
            raise ValueError(f"resize to {len(devices)} devices: the {runner.net.n_physical_experts} physical "
                             f"experts per layer do not divide over EP{len(devices)}")
        self.pending = devices
        moves = migrations(engine.scheduler, list(range(dp, runner.ranks)))
        if moves:
            runner.pool = copy_blocks(runner.pool, runner.cache_mesh, runner.pool, runner.cache_mesh,
                                      [(req.rank, req.blocks, rank, blocks) for req, rank, blocks in moves])
            for req, rank, blocks in moves:
                engine.scheduler.move(req, rank, blocks)
                runner.inputs.release(req.id)  # (other blocks: its page table is sent again)
        self.history.append({"from_dp": runner.ranks, "to_dp": dp, "migrated": len(moves),
                             "requested_at": time.perf_counter() - engine.started})
        self.advance()

    def resize_dp(self, dp: int, spare: list) -> None:
        """Resize to dp ranks: leaving devices go to `spare`, new ranks come from it (in order)."""
        runner = self.engine.runner
        current = list(runner.mesh.devices.flat)
        want = dp * (len(current) // runner.ranks)
        if dp < 1 or want - len(current) > len(spare):
            raise ValueError(f"resize the {self.engine.role} engine to dp={dp}: needs {want} devices, "
                             f"{len(current)} held and {len(spare)} spare")
        if want < len(current):
            self.resize(current[:want])
            spare[:0] = current[want:]  # the most recently released are handed out first
        elif want > len(current):
            self.resize(current + spare[:want - len(current)])
            del spare[:want - len(current)]

    def advance(self) -> None:
        """Completes the pending resize once the leaving ranks hold no requests (called before each step)."""
        engine, runner, devices = self.engine, self.engine.runner, self.pending
        dp = len(devices) // (runner.mesh.size // runner.ranks)
        scheduler = engine.scheduler
        if any(scheduler.running[dp:]) or any(r.rank >= dp for r in scheduler.outbox):
            return  # leaving ranks still finish requests that found no room elsewhere
        started = time.perf_counter()
        runner.move_to(make_mesh(dp, runner.mesh.size // runner.ranks, devices))
        scheduler.resize(dp)
        compiled = 0
        if self.warmed and self._ids(devices) not in self.warmed:  # (all-padding steps: KV stays as it is)
            compiled = engine.warmup()
        if engine.eplb is not None:
            engine.eplb.reset()
        engine.clock.hold(runner.mesh.size)
        self.pending = None
        engine.counters["resizes"] += 1
        self.history[-1].update(done_at=time.perf_counter() - engine.started, reshard_s=time.perf_counter() - started,
                                compilations=compiled)


def migrations(scheduler, leaving: list[int]) -> list[tuple]:
    """Moves for the requests of ranks about to leave: (request, new rank, new blocks), each placed
    by the decode balancer among the staying ranks. A request that finds no room stays, and
    finishes where it is. Apply each move with `Scheduler.move` once its blocks are copied."""
    for rank in leaving:
        scheduler.active[rank] = False
    loads, moves = scheduler.decode_loads(), []
    for rank in leaving:
        for req in scheduler.running[rank]:
            need = len(req.blocks)
            allowed = np.array([scheduler.active[r] and loads[r, 1] < scheduler.max_running
                                and scheduler.pools[r].available >= need for r in range(scheduler.ranks)])
            cost = np.tile([req.computed, 1.0], (scheduler.ranks, 1))
            dest = scheduler.decode_balancer.choose(loads, cost, allowed)
            if dest is None:
                continue
            loads[dest] += cost[dest]
            moves.append((req, dest, scheduler.pools[dest].allocate(need)))
    return moves
