"""The disk tier of the prefix KV cache: one file per full block, below the device prefix cache.

Blocks are keyed like the device cache (serving.kv_cache.block_hashes: a hash chain, so a block's
key covers every token before it). Files survive restarts and may be shared by several processes
and several models in one flat directory: a block's file name is the hex of
blake2b(identity + h, 16 bytes) + ".kvb", where identity digests the model and the cache layout.

File layout (little endian), a fixed 196-byte header followed by the raw payload:
    magic      8s   b"JSKVBLK\\0"
    version    u16  FORMAT_VERSION
    hash_len   u8   len(h)
    ndim       u8   rank of the block (at most 8)
    identity   32s  blake2b(identity, 32 bytes)
    h          32s  the block hash, zero padded
    dtype      16s  numpy dtype name ("float32", "bfloat16", ...), zero padded
    shape      8 x u64, unused dims 0
    nbytes     u64  payload length
    checksum   32s  blake2b(payload, 32 bytes)
    payload    nbytes of C-order array data

A file is written under a temporary name (.tmp-<pid>-<random>) in the same directory and renamed
with os.replace, so readers only ever see whole files. Each process keeps its own LRU index (its startup
scan, its own writes, files it meets in prefix/load) and enforces the capacity over that, so processes
sharing a directory should split the capacity between them. We do not fsync: a power cut can still leave
a short or garbled file behind a valid name, and the size and checksum checks on load catch it.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import os
import queue
import secrets
import struct
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"JSKVBLK\0"
FORMAT_VERSION = 1
SUFFIX = ".kvb"
TEMP_PREFIX = ".tmp-"
HEADER = struct.Struct("<8sHBB32s32s16s8QQ32s")
MAX_NDIM = 8
STALE_TEMP_S = 3600  # a temp file this old is abandoned even if its pid looks alive (pid reuse)
QUEUE_BLOCKS = 64  # pending async writes; beyond this we drop rather than hold device memory
COUNTERS = ("hits_blocks", "misses_blocks", "written", "evicted", "corrupt", "truncated", "foreign",
            "dropped", "write_errors")


class BadBlock(Exception):
    """A block file failed verification; args[0] is the stats counter to bump."""


def _digest(data: bytes, size: int) -> bytes:
    return hashlib.blake2b(data, digest_size=size).digest()


def _dtype(dtype) -> np.dtype:
    # np.dtype("bfloat16") fails even with ml_dtypes loaded, so resolve such names there first
    if isinstance(dtype, str) and hasattr(ml_dtypes, dtype):
        dtype = getattr(ml_dtypes, dtype)
    return np.dtype(dtype)


def _stale_temp(path: Path, mtime: float) -> bool:
    """A temp file is left over from a crashed writer unless its (same-host) writer still runs."""
    try:
        pid = int(path.name[len(TEMP_PREFIX):].split("-")[0])
        os.kill(pid, 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return True
    except PermissionError:
        pass  # the process exists but belongs to someone else
    return time.time() - mtime > STALE_TEMP_S


class DiskKVCache:
    def __init__(self, directory, capacity_mb: float, identity: bytes, block_shape: tuple[int, ...], dtype):
        """identity: digest of the model (config + weights fingerprint) and cache layout;
        block_shape e.g. (L, BS, C)."""
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"KV disk cache directory {self.dir} exists and is not a directory.")
        if not isinstance(capacity_mb, (int, float)) or not math.isfinite(capacity_mb) or capacity_mb <= 0:
            raise ValueError(f"KV disk cache capacity_mb must be a positive number, got {capacity_mb!r}.")
        if not isinstance(identity, bytes) or not identity:
            raise ValueError("KV disk cache identity must be non-empty bytes.")
        self.shape = tuple(block_shape)
        if not 0 < len(self.shape) <= MAX_NDIM or not all(isinstance(d, int) and d > 0 for d in self.shape):
            raise ValueError(f"KV disk cache block_shape must be 1 to {MAX_NDIM} positive ints, got {block_shape!r}.")
        try:
            self.dtype = _dtype(dtype)
        except TypeError:
            raise ValueError(f"KV disk cache dtype {dtype!r} is not a numpy or ml_dtypes type.") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self._identity_digest = _digest(identity, 32)
        self.capacity_bytes = int(capacity_mb * 2**20)
        self._lock = threading.Lock()
        self._index: collections.OrderedDict[str, int] = collections.OrderedDict()  # name -> size, LRU first
        self._used = self._reserved = 0  # bytes in indexed files / in writes under way
        self._pending: set[str] = set()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._scan()
        self._queue: queue.Queue = queue.Queue(QUEUE_BLOCKS)
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._writer.start()

    def _scan(self) -> None:
        """Index existing blocks oldest first (mtime is the recency a load hit refreshes)."""
        found = []
        for path in self.dir.iterdir():
            try:
                st = path.stat()
                if path.name.startswith(TEMP_PREFIX) and _stale_temp(path, st.st_mtime):
                    path.unlink()
                elif path.suffix == SUFFIX and path.is_file():
                    found.append((st.st_mtime_ns, path.name, st.st_size))
            except FileNotFoundError:
                pass  # another process removed it meanwhile
        for _, name, size in sorted(found):
            self._index[name] = size
            self._used += size

    def path(self, h: bytes) -> Path:
        return self.dir / (hashlib.blake2b(self.identity + h, digest_size=16).hexdigest() + SUFFIX)

    def prefix(self, hashes: list[bytes]) -> int:
        """How many leading hashes have a file (index/stat only, no read)."""
        n = 0
        for h in hashes:
            if not self._present(self.path(h)):
                break
            n += 1
        return n

    def _present(self, path: Path) -> bool:
        with self._lock:
            if path.name in self._index:
                return True
        try:  # another process may have written it since our scan: adopt it
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        with self._lock:
            if path.name not in self._index:
                self._index[path.name] = size
                self._index.move_to_end(path.name, last=False)  # we know nothing of its recency
                self._used += size
        return True

    def load(self, h: bytes) -> np.ndarray | None:
        """Read + verify; on any failure: count the reason, delete the file, return None (caller recomputes)."""
        path = self.path(h)
        try:
            with open(path, "rb") as f:
                buf = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(buf)
            rows = self._verify(buf, h)
            os.utime(path)  # recency survives restarts and is seen by other processes' scans
        except OSError:  # absent, evicted or deleted by another process meanwhile, or unreadable
            return self._miss(None, path)
        except BadBlock as bad:
            return self._miss(bad.args[0], path)
        with self._lock:
            self._used += len(buf) - self._index.pop(path.name, 0)
            self._index[path.name] = len(buf)
            self._counts["hits_blocks"] += 1
        return rows

    def _verify(self, buf: bytearray, h: bytes) -> np.ndarray:
        if len(buf) < HEADER.size:
            raise BadBlock("truncated")
        magic, version, hlen, ndim, ident, fh, dname, *rest = HEADER.unpack_from(buf)
        shape, nbytes, checksum = tuple(rest[:ndim]), rest[MAX_NDIM], rest[MAX_NDIM + 1]
        # identity and layout are checked before size: a foreign file is wrong whatever its length
        if (magic, version, ident, fh[:hlen]) != (MAGIC, FORMAT_VERSION, self._identity_digest, h):
            raise BadBlock("foreign")
        if dname.rstrip(b"\0") != self.dtype.name.encode() or shape != self.shape:
            raise BadBlock("foreign")
        if nbytes != math.prod(self.shape) * self.dtype.itemsize or len(buf) != HEADER.size + nbytes:
            raise BadBlock("truncated")
        payload = memoryview(buf)[HEADER.size:]
        if _digest(payload, 32) != checksum:
            raise BadBlock("corrupt")
        return np.frombuffer(buf, self.dtype, offset=HEADER.size).reshape(self.shape)

    def _miss(self, reason: str | None, path: Path) -> None:
        with self._lock:
            self._counts["misses_blocks"] += 1
            self._used -= self._index.pop(path.name, 0)
            if reason:
                self._counts[reason] += 1
        if reason:  # a bad file would fail again: delete it so the caller's recomputed block replaces it
            path.unlink(missing_ok=True)

    def store(self, h: bytes, rows: np.ndarray) -> None:
        """Atomic write; skip if present; evict LRU first so the directory never exceeds capacity."""
        rows = np.ascontiguousarray(rows)
        if rows.shape != self.shape or rows.dtype != self.dtype or len(h) > 32:
            raise ValueError(f"KV disk cache block must be {self.dtype.name}{list(self.shape)} with a hash of "
                             f"at most 32 bytes, got {rows.dtype.name}{list(rows.shape)} and {len(h)} bytes.")
        path, size = self.path(h), HEADER.size + rows.nbytes
        if size > self.capacity_bytes or self._present(path):
            return
        with self._lock:
            if path.name in self._pending or not self._evict(size):
                return
            self._reserved += size
            self._pending.add(path.name)
        try:
            self._write(path, h, rows)
            with self._lock:  # (a concurrent prefix or load may have adopted the new file already)
                self._used += size - self._index.pop(path.name, 0)
                self._index[path.name] = size
                self._counts["written"] += 1
        finally:
            with self._lock:
                self._reserved -= size
                self._pending.discard(path.name)

    def _evict(self, size: int) -> bool:
        """Under the lock: drop least recently used files until `size` more bytes fit (False: they never
        will, as concurrent writes have reserved the rest)."""
        while self._index and self._used + self._reserved + size > self.capacity_bytes:
            name, old = self._index.popitem(last=False)
            self._used -= old
            self._counts["evicted"] += 1
            (self.dir / name).unlink(missing_ok=True)
        return self._used + self._reserved + size <= self.capacity_bytes

    def _write(self, path: Path, h: bytes, rows: np.ndarray) -> None:
        payload = rows.reshape(-1).view(np.uint8)
        dims = self.shape + (0,) * (MAX_NDIM - len(self.shape))
        header = HEADER.pack(MAGIC, FORMAT_VERSION, len(h), len(self.shape), self._identity_digest, h,
                             self.dtype.name.encode(), *dims, payload.nbytes, _digest(payload, 32))
        tmp = self.dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def store_async(self, h: bytes | list[bytes], rows) -> None:
        """rows may be a jax.Array still being computed; the background writer materializes and stores it.
        With a list of hashes, rows holds those blocks along axis 1 (rows[:, j] is block j; rows past
        the list are padding), so a device gather of several blocks crosses to the host once."""
        try:
            if self._closed:
                raise queue.Full
            self._queue.put_nowait((h, rows))
        except queue.Full:  # the disk is behind (or we are closed): the block is not cached, nobody waits
            with self._lock:
                self._counts["dropped"] += 1 if isinstance(h, bytes) else len(h)

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                hashes, rows = item
                rows = np.asarray(rows)
                for j, h in enumerate([hashes] if isinstance(hashes, bytes) else hashes):
                    self.store(h, rows if isinstance(hashes, bytes) else rows[:, j])
            except Exception:  # a cache write must never kill the writer (disk full, bad block, ...)
                log.exception("disk KV tier: a block write to %s failed (counted in write_errors)", self.dir)
                with self._lock:
                    self._counts["write_errors"] += 1
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def flush(self) -> None:
        """Wait until queued writes are on disk."""
        self._queue.join()

    def close(self) -> None:
        self._closed = True
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    @property
    def stats(self) -> dict:
        with self._lock:
            return dict(self._counts, files=len(self._index), bytes_used=self._used,
                        capacity_bytes=self.capacity_bytes)
