"""The disk tier wired to an engine: at admission, blocks found on disk are written into the
rank's fresh pool blocks; after a prompt is prefilled, its full blocks the disk lacks are gathered
on device and handed to the background writer (serving/kv_disk.py holds the file format).

Over several processes every process runs the same scheduler, and the copies in and out of the
pool are collectives, so every decision that reads files is made ONCE and shared
(serving/multihost.Shared): how many leading blocks the disk holds (process 0), how many of them
loaded and verified (the process holding the rank's devices: it is the one that needs the rows),
which blocks to write (again the rank's process, which alone writes them). Processes on one
shared directory (DeepSeek's 3FS) then share hits; with per-host directories they still agree.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from serving.kv_cache import pow2, rank_devices, read_rank, write_rank
from serving.kv_disk import DiskKVCache
from serving.request import Request


def model_identity(net) -> bytes:
    """A digest of the model a KV block was computed by: its config, dtype and a sample of its
    weights (two models with one config differ there), so a disk block from another model is never
    taken for ours."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(net.config.to_dict(), sort_keys=True).encode() + jnp.dtype(net.dtype).name.encode()
             + net.quantization.encode())  # FP8 GEMMs compute other KV rows than the dequantised model
    head = net.lm_head.weight if net.lm_head is not None else net.embed_tokens.weight
    for weight in (net.embed_tokens.weight, head, net.norm.weight):
        h.update(np.asarray(weight[...].addressable_data(0)[:64]).tobytes())
    return h.digest()


class DiskTier:
    def __init__(self, runner, counters: dict):
        serving, bs = runner.serving, runner.serving.block_size
        layers = runner.pool.shape[0]  # the main layers, and the MTP module's rows when it drafts
        layout = f"block={bs} width={runner.width} kv={jnp.dtype(runner.kv_dtype).name} layers={layers}".encode()
        self.cache = DiskKVCache(serving.disk_cache_dir, serving.disk_cache_mb, model_identity(runner.net) + layout,
                                 (layers, bs, runner.width), runner.kv_dtype)
        self.runner, self.counters, self.block_size = runner, counters, bs
        self.shared = None
        if jax.process_count() > 1:
            from serving.multihost import Shared
            self.shared = Shared("disk")

    def _once(self, decide, writer: int):
        return decide() if self.shared is None else self.shared.agree(decide, writer)

    def _owner(self, rank: int) -> int:
        """The process holding the rank's devices (its KV rows live there)."""
        return rank_devices(self.runner.pool, self.runner.cache_mesh)[rank][0].process_index

    def prefix(self, hashes: list[bytes]) -> int:
        """How many leading blocks the disk holds (a lookup, no read), decided on process 0."""
        return self._once(lambda: self.cache.prefix(hashes), 0)

    def fetch(self, rank: int, hashes: list[bytes], blocks: list[int]) -> int:
        """Loads the leading blocks the disk holds into this rank's blocks; stops at the first missing
        or bad one (which the disk tier has counted and deleted: that block is recomputed)."""
        rows = []

        def load() -> int:
            for h in hashes:
                block = self.cache.load(h)
                if block is None:
                    break
                rows.append(block)
            return len(rows)
        n = self._once(load, self._owner(rank))
        if n:
            K, runner = pow2(n), self.runner
            # [L, K, BS, C] on the rank's process; the others take part in the write with no rows
            padded = np.stack(rows + [np.zeros_like(rows[0])] * (K - n), 1) if rows else None
            runner.pool = write_rank(runner.pool, runner.cache_mesh, {rank: (blocks[:n], padded)}, K)
            self.counters["disk_cached_prompt_tokens"] += n * self.block_size
        return n

    def store(self, req: Request) -> None:
        """Writes the request's full prompt blocks the disk lacks, behind the engine's back."""
        new = self._once(lambda: [i for i, h in enumerate(req.hashes) if not self.cache.prefix([h])],
                         self._owner(req.rank))
        if new:
            runner = self.runner
            rows = read_rank(runner.pool, runner.cache_mesh, {req.rank: [req.blocks[i] for i in new]}, pow2(len(new)))
            if req.rank in rows:  # read_rank returns the ranks this process holds: the rank's process writes
                self.cache.store_async([req.hashes[i] for i in new], rows[req.rank])
