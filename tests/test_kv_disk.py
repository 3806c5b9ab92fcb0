"""serving.kv_disk: blocks round-trip exactly and survive a restart; damaged, short and foreign files
are counted, deleted and never returned; the directory stays within capacity in LRU order; async
writes land after flush; crashed writers' temp files are cleaned up."""

import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from serving.kv_cache import block_hashes
from serving.kv_disk import HEADER, DiskKVCache

SHAPE = (2, 4, 8)  # L, BS, C
ID = b"model-a"
BLOCK_BYTES = HEADER.size + int(np.prod(SHAPE)) * 4  # one float32 block file


def rows(seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(dtype)


def cache(tmp_path, blocks=100, identity=ID, dtype=np.float32, sub="kv"):
    return DiskKVCache(tmp_path / sub, blocks * BLOCK_BYTES / 2**20, identity, SHAPE, dtype)


def dir_bytes(c):
    return sum(p.stat().st_size for p in c.dir.iterdir())


HASHES = block_hashes(list(range(40)), 4)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, "bfloat16", np.float16])
def test_round_trip_is_exact_and_survives_a_restart(tmp_path, dtype):
    c = cache(tmp_path, dtype=dtype)
    blocks = {h: rows(i, c.dtype) for i, h in enumerate(HASHES[:3])}
    for h, r in blocks.items():
        c.store(h, r)
    assert c.stats["written"] == 3 and c.stats["files"] == 3
    c.close()
    again = cache(tmp_path, dtype=dtype)  # a fresh process on the same directory
    assert again.prefix(HASHES) == 3
    for h, r in blocks.items():
        got = again.load(h)
        assert got.dtype == r.dtype and got.shape == SHAPE
        assert got.tobytes() == r.tobytes()
    assert again.stats["hits_blocks"] == 3 and again.stats["misses_blocks"] == 0
    again.close()


def test_processes_sharing_a_directory_see_each_others_blocks(tmp_path):
    a, b = cache(tmp_path), cache(tmp_path)
    a.store(HASHES[0], rows(0))
    assert b.prefix(HASHES) == 1  # written after b's startup scan
    assert b.stats["files"] == 1 and b.stats["bytes_used"] == dir_bytes(b)  # and now counted against capacity
    np.testing.assert_array_equal(b.load(HASHES[0]), rows(0))
    b.store(HASHES[0], rows(1))  # already there: not rewritten
    assert b.stats["written"] == 0 and b.stats["files"] == 1 and b.stats["bytes_used"] == dir_bytes(b)


def test_store_of_present_block_is_skipped(tmp_path):
    c = cache(tmp_path)
    c.store(HASHES[0], rows(0))
    c.store(HASHES[0], rows(1))
    assert c.stats["written"] == 1
    np.testing.assert_array_equal(c.load(HASHES[0]), rows(0))


def damage_flip(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def damage_truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def damage_short_header(path):
    path.write_bytes(path.read_bytes()[:HEADER.size - 1])


def damage_grow(path):
    path.write_bytes(path.read_bytes() + b"\0")


@pytest.mark.parametrize("damage,reason", [(damage_flip, "corrupt"), (damage_truncate, "truncated"),
                                           (damage_short_header, "truncated"), (damage_grow, "truncated")])
def test_damaged_files_are_counted_deleted_and_never_returned(tmp_path, damage, reason):
    c = cache(tmp_path)
    c.store(HASHES[0], rows(0))
    path = c.path(HASHES[0])
    damage(path)
    assert c.load(HASHES[0]) is None
    assert not path.exists()
    s = c.stats
    assert s[reason] == 1 and s["misses_blocks"] == 1 and s["hits_blocks"] == 0 and s["files"] == 0
    assert sum(s[k] for k in ("corrupt", "truncated", "foreign")) == 1
    assert c.load(HASHES[0]) is None and c.stats["misses_blocks"] == 2  # now simply absent


def test_file_from_another_model_is_foreign(tmp_path):
    other = cache(tmp_path, identity=b"model-b", sub="other")
    other.store(HASHES[0], rows(0))
    c = cache(tmp_path)
    assert c.path(HASHES[0]).name != other.path(HASHES[0]).name  # models sharing a directory do not collide
    shutil.copy(other.path(HASHES[0]), c.path(HASHES[0]))
    assert c.prefix(HASHES[:1]) == 1  # only stat: the header is not read
    assert c.load(HASHES[0]) is None
    assert c.stats["foreign"] == 1 and not c.path(HASHES[0]).exists()
    # a block of ours stored under another hash's name is just as foreign
    c.store(HASHES[1], rows(1))
    os.replace(c.path(HASHES[1]), c.path(HASHES[2]))
    assert c.load(HASHES[2]) is None and c.stats["foreign"] == 2
    # same identity and size but another dtype (a caller that forgot the layout in identity): still foreign
    half = cache(tmp_path, dtype=np.float16, sub="half")
    half.store(HASHES[3], rows(3, np.float16))
    brain = cache(tmp_path, dtype=ml_dtypes.bfloat16, sub="half")
    assert brain.load(HASHES[3]) is None and brain.stats["foreign"] == 1


def test_file_adopted_by_a_concurrent_prefix_during_a_write_is_counted_once(tmp_path):
    c = cache(tmp_path)
    write = c._write

    def write_then_race(path, h, rows):  # another thread's prefix() sees the file before store() records it
        write(path, h, rows)
        assert c.prefix([h]) == 1

    c._write = write_then_race
    c.store(HASHES[0], rows(0))
    assert c.stats["files"] == 1 and c.stats["bytes_used"] == dir_bytes(c)


def test_directory_stays_within_capacity_in_lru_order(tmp_path):
    c = cache(tmp_path, blocks=3)
    for i, h in enumerate(HASHES[:3]):
        c.store(h, rows(i))
    assert c.load(HASHES[0]) is not None  # now the most recently used
    c.store(HASHES[3], rows(3))  # evicts HASHES[1], the least recently used
    assert c.path(HASHES[0]).exists() and not c.path(HASHES[1]).exists()
    assert c.stats["evicted"] == 1
    for i, h in enumerate(HASHES[4:], 4):
        c.store(h, rows(i))
        assert dir_bytes(c) <= c.capacity_bytes
        assert c.stats["bytes_used"] == dir_bytes(c)
    assert c.stats["files"] == 3 and c.stats["evicted"] == len(HASHES) - 3
    assert [c.load(h) is not None for h in HASHES[-4:]] == [False, True, True, True]


def test_recency_survives_a_restart(tmp_path):
    c = cache(tmp_path, blocks=2)
    c.store(HASHES[0], rows(0))
    c.store(HASHES[1], rows(1))
    os.utime(c.path(HASHES[0]), ns=(1, 1))
    os.utime(c.path(HASHES[1]), ns=(2, 2))
    c.load(HASHES[0])  # refreshes the mtime, so a later process sees HASHES[1] as oldest
    again = cache(tmp_path, blocks=2)
    again.store(HASHES[2], rows(2))
    assert again.path(HASHES[0]).exists() and not again.path(HASHES[1]).exists()


def test_block_larger_than_capacity_is_not_stored(tmp_path):
    c = cache(tmp_path, blocks=0.5)
    c.store(HASHES[0], rows(0))
    assert c.stats["written"] == 0 and list(c.dir.iterdir()) == []


def test_store_async_then_flush_writes_the_file(tmp_path):
    c = cache(tmp_path)
    for i, h in enumerate(HASHES[:5]):
        c.store_async(h, rows(i))
    c.flush()
    assert c.stats["written"] == 5 and all(c.path(h).exists() for h in HASHES[:5])
    np.testing.assert_array_equal(c.load(HASHES[4]), rows(4))
    c.store_async(HASHES[5], rows(0)[:1])  # wrong shape: counted, the writer lives on
    c.store_async(HASHES[6], rows(6))
    c.flush()
    assert c.stats["write_errors"] == 1 and c.path(HASHES[6]).exists()
    c.close()
    c.store_async(HASHES[7], rows(7))  # after close: dropped, never hangs
    assert c.stats["dropped"] == 1


def test_leftover_temp_file_is_cleaned_at_startup(tmp_path):
    c = cache(tmp_path)
    c.store(HASHES[0], rows(0))
    stale = c.dir / ".tmp-999999999-deadbeef"  # a writer that crashed before os.replace
    shutil.copy(c.path(HASHES[0]), stale)
    live = c.dir / f".tmp-{os.getpid()}-cafe"  # a writer that is still running
    live.write_bytes(b"partial")
    abandoned = c.dir / f".tmp-{os.getpid()}-0ld"  # a live pid, but hours old: pid reused, writer long gone
    abandoned.write_bytes(b"partial")
    os.utime(abandoned, (0, 0))
    again = cache(tmp_path)
    assert not stale.exists() and not abandoned.exists() and live.exists()
    assert again.stats["files"] == 1 and again.stats["bytes_used"] == c.path(HASHES[0]).stat().st_size


def test_prefix_counts_only_leading_present_blocks(tmp_path):
    c = cache(tmp_path)
    for i in (0, 1, 3):
        c.store(HASHES[i], rows(i))
    assert c.prefix(HASHES) == 2
    assert c.prefix(HASHES[1:]) == 1
    assert c.prefix(HASHES[2:]) == 0
    assert c.prefix([]) == 0
    c.path(HASHES[1]).unlink()  # another process removed it: prefix may say 2, but load must miss
    assert c.load(HASHES[1]) is None and c.prefix(HASHES) == 1


@pytest.mark.parametrize("kwargs,field", [({"capacity_mb": 0}, "capacity_mb"), ({"capacity_mb": -1.0}, "capacity_mb"),
                                          ({"identity": b""}, "identity"), ({"block_shape": (2, 0)}, "block_shape"),
                                          ({"dtype": "no-such-type"}, "dtype")])
def test_bad_constructor_input_names_the_field(tmp_path, kwargs, field):
    args = dict(directory=tmp_path, capacity_mb=1.0, identity=ID, block_shape=SHAPE, dtype=np.float32) | kwargs
    with pytest.raises(ValueError, match=field):
        DiskKVCache(**args)


def test_directory_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory"):
        DiskKVCache(tmp_path / "f", 1.0, ID, SHAPE, np.float32)
