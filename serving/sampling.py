"""SamplingParams and the on-device sampler (greedy, temperature, top-k, top-p, per-request seed)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # None: derived from the request id
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2 ** 31:
            problems.append(f"top_k must be an integer in [0, 2^31), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32):
            problems.append(f"seed must be an integer in [0, 2^32), got {self.seed!r}")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @classmethod
    def from_dict(cls, raw: dict) -> "SamplingParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown} (known: {sorted(known)})")
        return cls(**raw)


def sample(logits, temperature, top_k, top_p, seeds, counters):
    """logits float32[B, V]; per row: temperature, top_k (0 = off), top_p, seed, counter (the
    position being sampled, so a request's draws do not depend on its batch neighbours) -> int32[B]."""
    V = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=1)
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    masked = jnp.where(scaled >= jnp.maximum(threshold, kth), scaled, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    drawn = jax.vmap(jax.random.categorical)(keys, masked)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def sampling_arrays(params: list[SamplingParams | None], seeds: list[int], counters: list[int]) -> tuple:
    """Host arrays for `sample`; None rows (padding) sample greedily and are discarded."""
    t = np.array([p.temperature if p else 0.0 for p in params], np.float32)
    k = np.array([p.top_k if p else 0 for p in params], np.int32)
    tp = np.array([p.top_p if p else 1.0 for p in params], np.float32)
    return t, k, tp, np.array(seeds, np.uint32), np.array(counters, np.int32)
