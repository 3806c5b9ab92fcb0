"""The disk tier of the prefix cache, in the engine: a second engine process on the same directory
gets prefix hits and the same tokens; a flipped byte, a truncated file and another model's file are
each detected, counted and recomputed; the directory stays within its capacity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving import LLM, SamplingParams
from serving.kv_cache import block_hashes
from serving.kv_disk import DiskKVCache

ROOT = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(max_tokens=5, ignore_eos=True)
PREFIX = "add 12+7=19\nadd 30+4=34\nadd 5+61=66\n"
SHARED = [PREFIX + f"add {a}+{b}=" for a, b in ((3, 4), (10, 20), (7, 81), (44, 5))]
DISTINCT = [f"sort N={n}\nreverse N={n[::-1]}\nadd 1+2=" for n in ("48213", "90817", "55102")]  # own first blocks
LONG = [f"reverse N={'%d' % (k * 7919)}" * 5 for k in range(1, 5)]  # fill the tier so it must evict
BLOCK_FILE = 196 + 4 * 16 * 48 * 4  # header + [layers, block, 512-equivalent latent + rope] fp32
CAPACITY_MB = 15 * BLOCK_FILE / 2 ** 20


def deployment(path: Path, directory: Path) -> Path:
    path.write_text(json.dumps({
        "name": "cpu2-disk", "mesh": {"dp": 2}, "dispatch": {"dtype": "fp32", "combine_dtype": "fp32"},
        "serving": {"disk_cache_dir": str(directory), "disk_cache_mb": CAPACITY_MB, "kv_dtype": "fp32",
                    "prefill_tokens": [64], "prefill_rows": [4], "decode_batch": [8]}}))
    return path


def tier_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir())


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The first engine: fills the disk tier, then serves the checked prompts."""
    tmp = tmp_path_factory.mktemp("disk")
    directory = tmp / "kv"
    dep = deployment(tmp / "deploy.json", directory)
    llm = LLM(deployment=dep)
    llm.generate(LONG, PARAMS)
    outs = llm.generate(SHARED + DISTINCT, PARAMS)
    llm.engine.disk.flush()
    return llm, dep, directory, {o.prompt_token_ids.__repr__(): o.token_ids for o in outs}


def test_first_engine_writes_blocks_within_capacity(first):
    llm, _, directory, _ = first
    disk = llm.stats()["disk"]
    assert disk["written"] >= 15 and disk["evicted"] > 0
    assert tier_bytes(directory) <= CAPACITY_MB * 2 ** 20 and disk["files"] == len(list(directory.iterdir()))


def test_second_process_gets_prefix_hits_and_same_tokens(first):
    _, dep, directory, expected = first
    script = ("import json, sys; from serving import LLM, SamplingParams\n"
              f"llm = LLM(deployment={str(dep)!r})\n"
              f"outs = llm.generate({SHARED + DISTINCT!r}, SamplingParams(max_tokens=5, ignore_eos=True))\n"
              "s = llm.stats()\n"
              "print(json.dumps({'tokens': {repr(o.prompt_token_ids): o.token_ids for o in outs},"
              " 'cached': [o.cached_tokens for o in outs], 'disk': s['disk'],"
              " 'disk_tokens': s['disk_cached_prompt_tokens']}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    second = json.loads(done.stdout.strip().splitlines()[-1])
    assert second["tokens"] == expected
    assert second["cached"][0] >= 32  # its very first request found the shared prefix on disk
    assert second["disk"]["hits_blocks"] >= 2 + len(DISTINCT) * 2 and second["disk_tokens"] >= 32 * 4
    assert second["disk"]["corrupt"] == second["disk"]["truncated"] == second["disk"]["foreign"] == 0
    assert tier_bytes(directory) <= CAPACITY_MB * 2 ** 20


def test_bad_blocks_are_detected_counted_and_recomputed(first):
    llm, dep, directory, expected = first
    tier = llm.engine.disk
    ids = [llm._ids(p) for p in DISTINCT]
    files = [tier.path(block_hashes(i, 16)[0]) for i in ids]
    assert all(f.is_file() for f in files)
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the payload
    files[0].write_bytes(bytes(data))
    with open(files[1], "r+b") as f:  # a crash mid-copy, say
        f.truncate(files[1].stat().st_size - 1000)
    other = DiskKVCache(directory.parent / "other", 1, b"another model", tier.shape, tier.dtype)
    h = block_hashes(ids[2], 16)[0]
    other.store(h, tier.load(h))  # the same tokens' block, but written for another model ...
    os.replace(other.path(h), files[2])  # ... under our name
    again = LLM(deployment=dep)  # a fresh engine: it scans the directory anew
    outs = again.generate(DISTINCT, PARAMS)
    disk = again.stats()["disk"]
    assert (disk["corrupt"], disk["truncated"], disk["foreign"]) == (1, 1, 1)
    assert [o.cached_tokens for o in outs] == [0, 0, 0]  # recomputed, not used
    assert [o.token_ids for o in outs] == [expected[repr(i)] for i in ids]
    again.engine.disk.flush()
    assert all(f.is_file() for f in files)  # rewritten whole by the recomputation
    assert DiskKVCache(directory, CAPACITY_MB, tier.identity, tier.shape, tier.dtype).load(h) is not None
    assert tier_bytes(directory) <= CAPACITY_MB * 2 ** 20
