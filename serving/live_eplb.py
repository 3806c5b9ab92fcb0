"""Live EPLB: every `experts.rebalance_interval` engine steps, the expert loads of the last window
-> DeepSeek's placement (sharding/eplb.py: rebalance_experts) -> expert weights moved into their new
slots between steps (XLA moves them between devices). The maps change with the weights, so no
output changes; the compiled step is reused (the weights' tree is the same). Also the balancedness
report of the loads seen so far (stats()["eplb"])."""

from __future__ import annotations

import collections

import numpy as np

from model.moe import move_experts
from sharding.eplb import balancedness, gpu_loads, logical_loads, rebalance_experts


class LiveEPLB:
    def __init__(self, runner, deployment):
        self.runner, self.deployment = runner, deployment
        self.interval = deployment.rebalance_interval  # 0: report only, never re-place
        self._window: collections.deque = collections.deque(maxlen=deployment.rebalance_window)
        self._seen = 0  # the accumulated expert loads at the last look
        self.rebalances, self.last = 0, None

    def reset(self) -> None:
        """The loads so far no longer describe the slots (a resize re-placed them)."""
        self._window.clear()
        self._seen = 0

    def warmup(self) -> None:
        """Compiles the expert move (one program whatever the placement, model/moe.py) by moving every
        expert to where it is, so a live rebalance compiles nothing."""
        if self.interval and self.runner.net.ep is not None:
            mlp = self.runner.net.moe_layers.mlp
            move_experts(self.runner.net.moe_layers, *(np.asarray(m[...]) for m in (mlp.phy2log, mlp.log2phy,
                                                                                 mlp.logcnt)))
            self.runner.refresh_weights()

    def after_step(self, steps: int) -> None:
        if self.interval and self.runner.net.ep is not None and steps % self.interval == 0:
            self.rebalance(steps)

    def rebalance(self, step: int) -> None:
        """The window's loads -> a new placement, applied if it is better than the current one."""
        runner, dep = self.runner, self.deployment
        net = runner.net
        mlp, ranks = net.moe_layers.mlp, net.ep.ranks
        self._window.append(self._unseen_logical_load())
        self._seen = np.asarray(runner.expert_load)
        phy2log, logcnt = np.asarray(mlp.phy2log[...]), np.asarray(mlp.logcnt[...])
        weight = sum(self._window)
        before = balancedness(weight, phy2log, logcnt, ranks)
        if weight.sum() == 0 or before.mean() <= dep.rebalance_threshold:
            return
        new = rebalance_experts(weight, phy2log.shape[1], net.config.n_group, dep.nodes_for(ranks), ranks)
        after = balancedness(weight, new[0], new[2], ranks)
        if after.mean() >= before.mean():
            return
        move_experts(net.moe_layers, *new)
        runner.refresh_weights()
        runner.reset_expert_load()  # slots now mean other experts (a host zero array: nothing to compile)
        self._seen = 0
        self.rebalances += 1
        self.last = {"step": step, "balancedness_before": before.tolist(), "balancedness_after": after.tolist(),
                     "mean_before": float(before.mean()), "mean_after": float(after.mean()),
                     "gpu_load_before": gpu_loads(weight, phy2log, logcnt, ranks).sum(0).tolist(),
                     "gpu_load_after": gpu_loads(weight, new[0], new[2], ranks).sum(0).tolist()}

    def stats(self) -> dict:
        """Balancedness (max / mean GPU load, per MoE layer and overall) of the loads seen so far under
        the current placement, and the last live rebalance's before/after."""
        net = self.runner.net
        if net.ep is None or not self.runner.expert_load.addressable_shards:
            return {}  # (no loads to read on a process that holds none of this engine's devices)
        mlp = net.moe_layers.mlp
        weight = sum(self._window) + self._unseen_logical_load()
        per_layer = balancedness(weight, np.asarray(mlp.phy2log[...]), np.asarray(mlp.logcnt[...]), net.ep.ranks)
        return {"balancedness_per_layer": per_layer.tolist(), "balancedness": float(per_layer.mean()),
                "rebalances": self.rebalances, "last": self.last}

    def _unseen_logical_load(self) -> np.ndarray:
        """Tokens per logical expert [L, E] since the last look, read through the current placement."""
        net = self.runner.net
        unseen = np.asarray(self.runner.expert_load) - self._seen
        return logical_loads(unseen, np.asarray(net.moe_layers.mlp.phy2log[...]), net.config.n_routed_experts)
