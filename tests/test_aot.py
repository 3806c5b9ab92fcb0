"""serving/aot.py: a compiled step saved by one AotStep is loaded by the next (same results, no new
file), a changed key or signature compiles anew, a damaged file is compiled again and replaced.
(The engine's own steps go through it whenever a compilation cache directory is set: the server
tests' subprocesses load what the in-process engines saved and must produce the same tokens.)"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.aot import AotStep, program_key


def step(weights, state, x, scale: float):
    # the engine step's shape: weights first, then donated state, batch arrays; static kwargs
    return (x * scale + weights["w"]).sum(), state + 1


def make(directory, identity="toy"):
    weights = {"w": jnp.ones(4)}
    jitted = jax.jit(step, static_argnames=("scale",), donate_argnums=(1,))
    return weights, AotStep(jitted, directory, program_key(identity, jax.tree.leaves(weights)), jax.devices()[:1],
                            out_tree=lambda args: jax.tree.structure((0, args[1])))


def test_saved_programs_load_and_stale_ones_do_not(tmp_path):
    weights, first = make(tmp_path)
    x = np.arange(4, dtype=np.float32)
    out, state = first(weights, jnp.zeros(3), x, scale=2.0)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and first._cache_size() == 1
    stamp = files[0].stat().st_mtime_ns

    weights, second = make(tmp_path)  # a later process: loads, compiles nothing, writes nothing
    out2, state2 = second(weights, jnp.zeros(3), x, scale=2.0)
    assert float(out2) == float(out) == float((x * 2 + 1).sum()) and np.array_equal(state2, state)
    assert sorted(tmp_path.iterdir()) == files and files[0].stat().st_mtime_ns == stamp

    second(weights, jnp.zeros(3), x, scale=3.0)  # another static value: another program
    second(weights, jnp.zeros(5), x, scale=2.0)  # another shape: another program
    assert len(list(tmp_path.iterdir())) == 3 and second._cache_size() == 3
    _, other = make(tmp_path, identity="another model")  # another key: nothing of the old is taken
    other(weights, jnp.zeros(3), x, scale=2.0)
    assert len(list(tmp_path.iterdir())) == 4

    files[0].write_bytes(files[0].read_bytes()[:100])  # damaged: compiled again, replaced
    weights, third = make(tmp_path)
    out3, _ = third(weights, jnp.zeros(3), x, scale=2.0)
    assert float(out3) == float(out) and files[0].stat().st_size > 100


def test_key_covers_environment_and_weights(monkeypatch):
    w = [jnp.ones(4)]
    key = program_key("toy", w)
    assert program_key("toy", w) == key
    assert program_key("toy", [jnp.ones(5)]) != key and program_key("toy", [jnp.ones(4, jnp.bfloat16)]) != key
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    assert program_key("toy", w) != key


def test_without_a_directory_it_is_the_jitted_function():
    weights, plain = make(None)
    out, _ = plain(weights, jnp.zeros(3), np.ones(4, np.float32), scale=1.0)
    assert float(out) == 8.0 and plain._cache_size() == 1


