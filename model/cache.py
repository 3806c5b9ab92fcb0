"""The latent KV cache seen by attention: one row of C = kv_lora_rank + qk_rope_head_dim values per
token and layer. Attention only calls `write` then `read`, so the serving engine can substitute
its paged pool (serving/kv_cache.py) for this dense one without touching model math. A cache whose
`in_place_decode` is true also offers `absorbed_context` (decode attention computed in place by
the deployment's kernel over its own layout) and `select_rows` (a view of some batch rows)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DenseCache:
    data: jax.Array  # [L, B, T, C]: slot t of sequence b holds position t
    in_place_decode: ClassVar[bool] = False  # attention always reads rows (and computes in XLA)

    def write(self, layer, slots, rows) -> "DenseCache":
        """rows [B, S, C] at positions slots int32[B, S] (-1: padding, not written). A slot past the
        cache is refused where it can be seen (outside jit); the host-facing calls check first."""
        T = self.data.shape[2]
        if not isinstance(slots, jax.core.Tracer) and np.size(slots) and int(np.asarray(slots).max()) >= T:
            raise ValueError(f"position {int(np.asarray(slots).max())} is past the cache of {T} slots per sequence")
        batch = jnp.arange(rows.shape[0])[:, None]
        return DenseCache(self.data.at[layer, batch, jnp.where(slots < 0, T, slots)].set(
            rows.astype(self.data.dtype), mode="drop"))

    @property
    def max_len(self) -> int:
        return self.data.shape[2]

    def read(self, layer) -> jax.Array:
        """-> [B, T, C]: every slot of the layer; attention masks the ones past each query."""
        return self.data[layer]

    def select_rows(self, pick) -> "DenseCache":
        """A view of some batch rows: pick maps [B, ...] to the rows wanted (reads only)."""
        return DenseCache(jnp.swapaxes(pick(jnp.swapaxes(self.data, 0, 1)), 0, 1))
