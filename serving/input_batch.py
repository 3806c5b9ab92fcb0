"""The persistent input batch (vLLM v1's InputBatch): what a step reads per request and what the
host would otherwise send every step, kept on the device and written only where it changed.

Each request a runner packs holds a row (a slot) until it leaves the engine. Per row the device
keeps:
- its page table, int32[N + 1, MB] (row N: the padding rows'). A step reads its rows' page tables
  from here; the host sends only the block ids the row has not sent before (`page_updates`): a
  decode step's new block when a sequence crosses a block boundary, a prompt's blocks once, a
  re-admitted request's once. Host work and bytes per step follow the blocks added, not the context.
- its last sampled token, int32[N + 2] (N: a dump slot for rows that sample nothing, N + 1: the
  flag of an overflowed step), written by the step that samples it and read by the same request's
  row in the next step: async scheduling dispatches step N + 1 before step N's tokens reach the
  host (serving/engine.py).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from sharding.mesh import logical_sharding

UPDATE_CHUNK = 4096  # page-table entries per write: the write's shapes are the powers of two up to it


class InputBatch:
    def __init__(self, capacity: int, max_blocks: int, mesh):
        """capacity: the requests a runner packs at once (its ranks x rows per rank)."""
        self.capacity, self.max_blocks = capacity, max_blocks
        self.reset(mesh)

    def reset(self, mesh) -> None:
        """Fresh rows (a new mesh, or after warm-up's padding steps): no request holds one."""
        self.free, self.held, self.sent = list(range(self.capacity - 1, -1, -1)), {}, {}
        sharding = logical_sharding(mesh) if mesh is not None else None
        self._write = _writer(sharding)
        self.tokens = jax.device_put(np.zeros(self.capacity + 2, np.int32), sharding)
        self.pages = jax.device_put(np.zeros((self.capacity + 1, self.max_blocks), np.int32), sharding)
        self.updates: list[tuple[int, int, list[int]]] = []  # (slot, first column, block ids) not yet written
        self.bytes_sent = self.entries_sent = 0  # page-table writes to the device since the start (tests)

    @property
    def dump(self) -> int:
        """The padding rows' page-table row, and the token slot of rows that sample nothing."""
        return self.capacity

    def slot(self, request_id: str) -> int:
        held = self.held.get(request_id)
        if held is None:
            if not self.free:  # (ModelRunner sizes it: the requests a rank runs at most)
                raise RuntimeError(f"request {request_id}: no input-batch row left of {self.capacity}")
            held = self.held[request_id] = self.free.pop()
            self.sent[request_id] = 0
        return held

    def page_row(self, request_id: str, blocks: list[int]) -> int:
        """The request's row, its page table brought up to `blocks` (the blocks it holds, which only
        grow while it holds the row: a request whose blocks are replaced first gives the row back)."""
        slot, blocks = self.slot(request_id), blocks[:self.max_blocks]
        sent = self.sent[request_id]
        if len(blocks) > sent:
            self.updates.append((slot, sent, blocks[sent:]))
            self.sent[request_id] = len(blocks)
        return slot

    def release(self, request_id: str) -> None:
        held = self.held.pop(request_id, None)
        if held is not None:
            self.free.append(held)
            del self.sent[request_id]

    def write(self) -> None:
        """Sends the page-table entries added since the last write (in chunks of power-of-two sizes)."""
        if not self.updates:
            return
        entries = np.concatenate([np.stack([np.full(len(b), s), np.arange(c, c + len(b)), b], axis=1)
                                  for s, c, b in self.updates]).astype(np.int32)  # [U, 3]: row, column, block
        self.updates, self.entries_sent = [], self.entries_sent + len(entries)
        for start in range(0, len(entries), UPDATE_CHUNK):
            part = entries[start:start + UPDATE_CHUNK]
            size = 1 << max(3, (len(part) - 1).bit_length())
            padded = np.zeros((size, 3), np.int32)
            padded[:, 0] = self.dump  # padding entries write the padding row
            padded[:len(part)] = part
            self.bytes_sent += padded.nbytes
            self.pages = self._write(self.pages, padded)

    def warm_up(self) -> None:
        """Compiles every write size on the padding row (nothing a request reads changes)."""
        size = 8
        while size <= UPDATE_CHUNK:
            entries = np.zeros((size, 3), np.int32)
            entries[:, 0] = self.dump
            self.pages = self._write(self.pages, entries)
            size *= 2


def _write_pages(pages, entries):
    """pages int32[N + 1, MB], entries int32[U, 3] (row, column, block id) -> pages with them written."""
    return pages.at[entries[:, 0], entries[:, 1]].set(entries[:, 2])


@functools.cache
def _writer(sharding):
    """The page-table write for pages placed so (its output placed the same: a write never meets a
    placement it was not compiled for; one per placement, so a mesh served before compiles nothing)."""
    return jax.jit(_write_pages, donate_argnums=0, out_shardings=sharding)
