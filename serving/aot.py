"""Compiled engine steps kept on disk between starts, so a restarted server neither compiles nor
traces: `AotStep` wraps the jitted step.

JAX's persistent compilation cache skips XLA's compilation, but only after the step has been
traced and lowered to StableHLO (its cache key is a hash of that module), and for DeepSeek-V3's
step that costs seconds per shape bucket (profiled on the CPU mesh: ~1.3 s tracing + ~2.9 s
lowering per bucket, against ~0.7 s to load the compiled program) -- minutes for a deployment's
50+ buckets. So each compiled program is also serialized (`jax.experimental.serialize_executable`)
under a key of everything the program is a function of, and a later start loads it directly.
Warm-up hands every bucket's signature to `AotStep.prepare`, which loads the saved programs on a
thread pool (deserializing releases the GIL: 2x on 2 cores) and compiles the missing ones there
while the main thread lowers the next.

A program is saved only from a fresh XLA compilation, never from one JAX's persistent cache
served: on XLA:CPU (jax 0.11.2) serializing a *deserialized* executable drops the object code of
kernels not yet run -- the file loads, and the first step that takes such a branch (say the
penalty `lax.cond`) fails with "NOT_FOUND: Function <fusion> not found" (tests/test_aot.py shows
it). That is what once broke a soak after thousands of good steps, when a source edit had changed
our key but not the HLO. So `prepare` compiles with JAX's cache switched off.

Saved programs need not stay loaded: XLA:CPU maps three memory regions (code, constants, data)
per kernel of a loaded executable -- about 860 for the embedded model's step -- and a Linux process
may hold 65,530 mappings (vm.max_map_count), i.e. about 75 engine steps. Every bucket at three EP
capacity levels is 62 on 8 devices (serving/buckets.py), so `release` lets the runner keep only the levels in use;
a released program is loaded again (not compiled) when a step needs it. Programs are lowered
through a jit wrapper of their own, so that JAX's in-memory caches do not keep them alive.

The key (`program_key`): the source of the packages that build the step (model/, sharding/,
serving/), jax and jaxlib versions, the backend and its devices, JAX_*/XLA_* environment and jax's
configuration, the step's own identity (model config, dtype, EP level, mesh: given by the engine),
the weights' shapes, dtypes and shardings, and per program the shapes and dtypes of the batch
arguments and the static arguments. Anything else changes nothing a program computes. A file that
does not load (truncated, another jaxlib) is compiled again and replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

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
    (the server sets it unless --no-serialized-steps; a library user opts in)."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or os.environ.get("JAXSEEK_SERIALIZED_STEPS") != "1":
        return None
    return Path(cache) / "jaxseek-steps"


class AotStep:
    """jax.jit(fun, **options)(*args, **static), one compiled program per signature (the shapes and
    dtypes of args[1:] -- args[0] are the weights, fixed by the key -- and the static arguments),
    each loaded from `directory` when a previous process saved it, else compiled and saved there.
    Without a directory it is the jitted function, but for the programs `prepare` compiled and holds
    (a background warm-up's: serving/warmup.py)."""

    def __init__(self, fun, options: dict, directory: Path | None, key: bytes, devices, out_tree):
        """options: jax.jit's keyword arguments. out_tree(args): the structure of the step's outputs
        (treedefs holding a mesh do not pickle)."""
        self.fun, self.options, self.jitted = fun, options, jax.jit(fun, **options)
        self.key, self.devices, self.out_tree = key, list(devices), out_tree
        self.directory = Path(directory) if directory and jax.process_count() == 1 else None
        self.compiled: dict[tuple, object] = {}
        self.pinned: set[tuple] = set()  # programs that could not be saved: never released
        self.compiles = self.loads = 0  # programs this process compiled, and loaded from the directory
        self._count_lock = threading.Lock()

    def __call__(self, *args, **static):
        if self.directory is None and not self.compiled:
            return self.jitted(*args, **static)
        sig = self._signature(args, static)
        program = self.compiled.get(sig)  # (one read: the warm-up thread may be adding programs)
        if program is None:
            if self.directory is None:
                return self.jitted(*args, **static)
            self.prepare([(args, static)])
            program = self.compiled[sig]
        return program(*args)

    @staticmethod
    def _signature(args, static) -> tuple:
        return tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args[1:])), tuple(sorted(static.items()))

    @property
    def saves(self) -> bool:
        """Whether its programs are kept on disk (else it is the jitted function)."""
        return self.directory is not None

    def prepare(self, calls: list[tuple[tuple, dict]], load: bool = True, threads: int = 4) -> None:
        """Has the programs of these (args, static) calls ready: saved ones loaded on a thread pool
        (load=False: left on disk until a call needs them), the others lowered here and compiled on
        up to `threads` others (XLA releases the GIL), then saved. Without a directory they are
        compiled and held. The args may be jax.ShapeDtypeStructs (with the arrays' shardings), so
        another thread can prepare programs while the step runs on (and donates) the real arrays."""
        todo = {}
        for args, static in calls:
            todo.setdefault(self._signature(args, static), (args, static))
        todo = {sig: call for sig, call in todo.items() if sig not in self.compiled}
        if not load and self.directory is not None:
            todo = {sig: call for sig, call in todo.items() if not self._path(sig).is_file()}
        if not todo:
            return
        if self.directory is not None:
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                loads = {sig: pool.submit(self._load, sig, args) for sig, (args, _) in todo.items()}
                for sig, done in loads.items():
                    if (program := done.result()) is not None:
                        self._hold(sig, program, loaded=True)
        missing = [sig for sig in todo if sig not in self.compiled]
        if not missing:
            return
        # a few compilations at a time: each holds a whole step's compiler state (GPU: its autotuning)
        fresh = _fresh_compiles(self.devices[0].platform) if self.directory is not None else contextlib.nullcontext()
        with fresh, ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1))) as pool:
            compiles = {sig: pool.submit(self._compile_and_save, sig, todo[sig][0], self._lower(*todo[sig]))
                        for sig in missing}
            for sig, done in compiles.items():
                self._hold(sig, done.result(), loaded=False)

    def _hold(self, sig, program, loaded: bool) -> None:
        with self._count_lock:  # (the warm-up thread and the engine thread may both be preparing)
            self.compiled = {**self.compiled, sig: program}  # rebound whole: a reader never sees it change
            if loaded:
                self.loads += 1
            else:
                self.compiles += 1

    def ready(self, calls: list[tuple[tuple, dict]]) -> bool:
        """Whether every program of these calls runs without compiling: held, or saved on disk."""
        sigs = [self._signature(args, static) for args, static in calls]
        return all(sig in self.compiled or (self.directory is not None and self._path(sig).is_file())
                   for sig in sigs)

    def _lower(self, args, static):
        # through a jit of its own: JAX's in-memory caches then let the executable go with our last
        # reference (through self.jitted they would keep it, and its memory maps, for good)
        return jax.jit(functools.partial(self.fun), **self.options).lower(*args, **static)

    def release(self) -> None:
        """Unloads the programs held that are saved (the next call loads them again); without a
        directory nothing is (they could only be compiled again)."""
        if self.directory is not None and len(self.compiled) > len(self.pinned):
            with self._count_lock:
                self.compiled = {sig: program for sig, program in self.compiled.items() if sig in self.pinned}
            trim_heap()

    def drop(self, calls: list[tuple[tuple, dict]]) -> None:
        """Unloads these calls' programs if they are saved (a raised capacity level's, prepared by the
        warm-up thread: loaded again when a step needs them)."""
        if self.directory is None:
            return
        sigs = {self._signature(args, static) for args, static in calls} - self.pinned
        with self._count_lock:
            self.compiled = {sig: program for sig, program in self.compiled.items() if sig not in sigs}

    @property
    def compilations(self) -> int:
        """XLA compilations of this step in this process (Engine.compilations sums them)."""
        return self.compiles + (self.jitted._cache_size() if self.directory is None else 0)

    def _path(self, sig) -> Path:
        return self.directory / f"step-{hashlib.blake2b(self.key + repr(sig).encode(), digest_size=20).hexdigest()}"

    def _load(self, sig, args):
        """The saved program, or None (none saved, or unreadable: it is compiled again and replaced)."""
        path = self._path(sig)
        if not path.is_file():
            return None
        try:
            return serialize_executable.deserialize_and_load(path.read_bytes(), jax.tree.structure((args, {})),
                                                             self.out_tree(args), execution_devices=self.devices)
        except Exception as e:  # noqa: BLE001
            log.warning("compiled step %s did not load (%s): compiling it again", path.name, e)
            return None

    def _compile_and_save(self, sig, args, lowered):
        compiled = lowered.compile()  # on CPU not from JAX's persistent cache (_fresh_compiles)
        if self.directory is None:
            return compiled
        blob, saved_in, saved_out = serialize_executable.serialize(compiled)
        in_tree, path = jax.tree.structure((args, {})), self._path(sig)
        assert (saved_in, saved_out) == (in_tree, self.out_tree(args)), "the step's trees are not what was declared"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(blob)
            tmp.replace(path)  # atomic: a reader sees the whole file or none
        except OSError as e:  # a full or read-only disk: serve on, keep this program loaded
            log.warning("compiled step not saved to %s (%s): it stays loaded", self.directory, e)
            self.pinned.add(sig)
        return compiled


def trim_heap() -> None:
    """Hands the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere). Without it
    a process that loads and unloads programs, or compiled some, keeps its high-water RSS: measured
    on the CPU mesh, four load/unload cycles of a capacity level's programs grew RSS by 210 MB, and
    stayed flat with a trim after each (docs/DESIGN_NOTES.md)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_fresh_lock = threading.Lock()


@contextlib.contextmanager
def _fresh_compiles(platform: str):
    """On CPU (the platform of the devices the step runs on), JAX's persistent cache off for the block
    (see the module docstring: a program it serves there cannot be saved whole). The switch is
    process-wide: compilations elsewhere in the block only skip the cache."""
    if platform != "cpu":
        yield
        return
    with _fresh_lock:
        was = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()  # is_cache_used() is decided once per process otherwise
        try:
            yield
        finally:
            jax.config.update("jax_enable_compilation_cache", was)
            compilation_cache.reset_cache()
