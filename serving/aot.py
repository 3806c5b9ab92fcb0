"""Compiled engine steps kept on disk between starts, so a restarted server neither compiles nor
traces: `AotStep` wraps the jitted step.

JAX's persistent compilation cache skips XLA's compilation, but only after the step has been
traced and lowered to StableHLO (its cache key is a hash of that module), and for DeepSeek-V3's
step that costs seconds per shape bucket (profiled on the CPU mesh: ~1.3 s tracing + ~2.9 s
lowering per bucket, against ~0.7 s to load the compiled program) -- minutes for a deployment's
50+ buckets. So each compiled program is also serialized (`jax.experimental.serialize_executable`)
under a key of everything the program is a function of, and a later start loads it directly.

The key (`program_key`): the source of the packages that build the step (model/, sharding/,
serving/), jax and jaxlib versions, the backend and its devices, JAX_*/XLA_* environment and jax's
configuration, the step's own identity (model config, dtype, EP level, mesh: given by the engine),
the weights' shapes, dtypes and shardings, and per program the shapes and dtypes of the batch
arguments and the static arguments. Anything else changes nothing a program computes. A file that
does not load (truncated, another jaxlib) is compiled again and replaced.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import jax
from jax.experimental import serialize_executable

log = logging.getLogger("serving.aot")
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "sharding", "serving")


def _source_digest() -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.digest()


_SOURCE = None


def program_key(identity: str, weights) -> bytes:
    """Everything a compiled step depends on but its batch shapes (see the module docstring)."""
    global _SOURCE
    if _SOURCE is None:
        _SOURCE = _source_digest()
    from jax._src.lib import version_str as jaxlib_version
    backend = jax.devices()[0].client
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_")))
    parts = [_SOURCE, jax.__version__, jaxlib_version, backend.platform, backend.platform_version,
             [(d.id, d.device_kind) for d in jax.devices()], env, sorted(jax.config.values.items(), key=str),
             identity, [(w.shape, str(w.dtype), str(w.sharding)) for w in weights]]
    return hashlib.blake2b(repr(parts).encode(), digest_size=20).digest()


def aot_directory() -> Path | None:
    """Beside JAX's persistent compilation cache, when one is configured and JAXSEEK_SERIALIZED_STEPS=1
    (the server's --serialized-steps). Off by default: on XLA:CPU (jax 0.11.2) a loaded step once
    failed at run time ("NOT_FOUND: Function add_select_fusion.1 not found") in a soak, after
    thousands of good steps; until that is understood, loading whole executables is opt-in."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or os.environ.get("JAXSEEK_SERIALIZED_STEPS") != "1":
        return None
    return Path(cache) / "jaxseek-steps"


class AotStep:
    """jitted(*args, **static), one compiled program per signature (the shapes and dtypes of
    args[1:] -- args[0] are the weights, fixed by the key -- and the static arguments), each loaded
    from `directory` when a previous process saved it, else compiled (through jax's own caches)
    and saved there. Without a directory it is the jitted function."""

    def __init__(self, jitted, directory: Path | None, key: bytes, devices, out_tree):
        """out_tree(args): the structure of the step's outputs (treedefs holding a mesh do not pickle)."""
        self.jitted, self.key, self.devices, self.out_tree = jitted, key, list(devices), out_tree
        self.directory = Path(directory) if directory and jax.process_count() == 1 else None
        self.compiled: dict[tuple, object] = {}

    def __call__(self, *args, **static):
        if self.directory is None:
            return self.jitted(*args, **static)
        sig = (tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args[1:])), tuple(sorted(static.items())))
        program = self.compiled.get(sig)
        if program is None:
            program = self.compiled[sig] = self._load_or_compile(sig, args, static)
        return program(*args)

    def _cache_size(self) -> int:
        """Programs this process compiled or loaded (Engine.compilations counts them)."""
        return len(self.compiled) if self.directory is not None else self.jitted._cache_size()

    def _load_or_compile(self, sig, args, static):
        path = self.directory / f"step-{hashlib.blake2b(self.key + repr(sig).encode(), digest_size=20).hexdigest()}"
        in_tree = jax.tree.structure((args, {}))
        if path.is_file():
            try:
                return serialize_executable.deserialize_and_load(path.read_bytes(), in_tree, self.out_tree(args),
                                                                 execution_devices=self.devices)
            except Exception as e:  # noqa: BLE001 - unreadable: compile again, replace the file
                log.warning("compiled step %s did not load (%s): compiling it again", path.name, e)
        compiled = self.jitted.lower(*args, **static).compile()
        blob, saved_in, saved_out = serialize_executable.serialize(compiled)
        assert (saved_in, saved_out) == (in_tree, self.out_tree(args)), "the step's trees are not what was declared"
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        tmp.replace(path)  # atomic: a reader sees the whole file or none
        return compiled
