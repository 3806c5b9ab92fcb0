"""serving/aot.py: a compiled step saved by one AotStep is loaded by the next (same results, no new
file), a changed key or signature compiles anew, a damaged file is compiled again and replaced, and
a program JAX's persistent cache would serve is compiled afresh before it is saved (XLA:CPU drops
unrun kernels when it re-serializes a deserialized executable). The server's own steps go through
it by default (tests/test_server.py, test_cli_subprocess_serves)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.compilation_cache import compilation_cache

from serving.aot import AotStep, program_key


def step(weights, state, x, scale: float):
    # the engine step's shape: weights first, then donated state, batch arrays; static kwargs
    return (x * scale + weights["w"]).sum(), state + 1


def make(directory, identity="toy"):
    weights = {"w": jnp.ones(4)}
    options = dict(static_argnames=("scale",), donate_argnums=(1,))
    return weights, AotStep(step, options, directory, program_key(identity, jax.tree.leaves(weights)), jax.devices()[:1],
                            out_tree=lambda args: jax.tree.structure((0, args[1])))


def test_saved_programs_load_and_stale_ones_do_not(tmp_path):
    weights, first = make(tmp_path)
    x = np.arange(4, dtype=np.float32)
    out, state = first(weights, jnp.zeros(3), x, scale=2.0)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and (first.compilations, first.loads) == (1, 0)
    stamp = files[0].stat().st_mtime_ns

    weights, second = make(tmp_path)  # a later process: loads, compiles nothing, writes nothing
    out2, state2 = second(weights, jnp.zeros(3), x, scale=2.0)
    assert (second.compilations, second.loads) == (0, 1)
    assert float(out2) == float(out) == float((x * 2 + 1).sum()) and np.array_equal(state2, state)
    assert sorted(tmp_path.iterdir()) == files and files[0].stat().st_mtime_ns == stamp

    second(weights, jnp.zeros(3), x, scale=3.0)  # another static value: another program
    second(weights, jnp.zeros(5), x, scale=2.0)  # another shape: another program
    assert len(list(tmp_path.iterdir())) == 3 and (second.compilations, second.loads) == (2, 1)
    second.release()  # unloaded, still saved: the next call loads it again
    out4, _ = second(weights, jnp.zeros(3), x, scale=2.0)
    assert float(out4) == float(out) and (second.compilations, second.loads) == (2, 2)
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
    assert float(out) == 8.0 and plain.compilations == 1


def branchy(weights, penalties):
    # a kernel only a rare branch runs, as the engine's penalty lax.cond
    def penalize(x):
        return jnp.where(penalties[:, None] > 0, x - penalties[:, None] * 2.0, x) * 3.0
    return jax.lax.cond(jnp.any(penalties > 0), penalize, lambda x: x, weights["w"]), penalties


@pytest.fixture
def jax_persistent_cache(tmp_path):
    """JAX's persistent cache in a fresh directory, keeping every program (restored afterwards)."""
    old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    yield tmp_path / "jax-cache"
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    compilation_cache.reset_cache()


def test_a_program_in_jaxs_cache_is_saved_whole(tmp_path, jax_persistent_cache):
    weights, none, some = {"w": jnp.ones((4, 8))}, jnp.zeros(4), jnp.array([0.0, 1.0, 0.0, 0.0])
    expected = np.asarray(jax.jit(branchy)(weights, some)[0])
    assert any(jax_persistent_cache.iterdir())  # JAX's cache holds the program now
    jax.clear_caches()  # a later process: only the persistent cache remains

    def make():
        return AotStep(branchy, {}, tmp_path / "steps", program_key("branchy", jax.tree.leaves(weights)),
                       jax.devices()[:1], out_tree=lambda args: jax.tree.structure((0, args[1])))

    make()(weights, none)  # compiled (not served by JAX's cache) and saved, the rare branch not run
    loaded = make()
    out, _ = loaded(weights, some)  # loaded from the file: the rare branch's kernel must be in it
    assert (loaded.compilations, loaded.loads) == (0, 1) and len(list((tmp_path / "steps").iterdir())) == 1
    np.testing.assert_array_equal(np.asarray(out), expected)
