"""python -m serving.server: vLLM's flags where they exist (docs/SERVER.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from serving.api import add_speculative_flags, speculative_flag
from serving.server.app import DEFAULT_MAX_BODY_BYTES


def default_cache_dir() -> Path:
    """Where compiled engine steps persist between starts: $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/jaxseek/jax-compilation (~/.cache when unset)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxseek" / "jax-compilation"


def use_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache: a second start of the same deployment loads every compiled
    step from disk instead of compiling it (keyed by program, devices and jax version: never stale).
    Every program is kept, however fast it compiled: a fast compile here may be a slow one elsewhere."""
    import jax
    if not path:
        return
    try:  # fail now in one sentence, not in the middle of warm-up
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".writable-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--compilation-cache-dir {path} is not writable ({e.strerror}): pass another "
                         f"directory, or '' to turn the cache off") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m serving.server",
                                 description="OpenAI-compatible HTTP server over the jaxseek engine.")
    ap.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--deployment", help="deployment file (default: every device present)")
    add_speculative_flags(ap)
    ap.add_argument("--quantization", choices=("fp8", "none"),
                    help="weights: fp8 or none (default: the deployment's, else fp8 on a GPU for an FP8 checkpoint)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", nargs="+", metavar="NAME",
                    help="the names clients may send as `model`, the first reported in responses (default: "
                         "--model as given; its directory name is accepted too)")
    ap.add_argument("--api-key", nargs="+", metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $JAXSEEK_API_KEY, else none)")
    ap.add_argument("--default-max-tokens", type=int, default=16,
                    help="max_tokens of a completion that gives none (chat: until EOS or the context)")
    ap.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                    help="larger request bodies get 413")
    ap.add_argument("--compilation-cache-dir", default=str(default_cache_dir()),
                    help="JAX's persistent compilation cache ('' turns it off)")
    ap.add_argument("--serialized-steps", action=argparse.BooleanOptionalAction, default=True,
                    help="keep whole compiled steps beside the cache and load them on the next start, without "
                         "tracing or lowering: seconds instead of minutes (serving/aot.py)")
    ap.add_argument("--no-warmup", action="store_true", help="compile shape buckets on first use, not at startup")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def main(argv=None) -> int:
    start = time.perf_counter()
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[server] %(message)s")
    if args.default_max_tokens < 1 or args.max_request_body_bytes < 1:
        ap.error("--default-max-tokens and --max-request-body-bytes must be >= 1")
    try:
        use_compilation_cache(args.compilation_cache_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ["JAXSEEK_SERIALIZED_STEPS"] = "1" if args.serialized_steps else "0"

    import uvicorn

    from serving.api import DEFAULT_MODEL, LLM
    from serving.server.app import Server
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    try:
        print(f"[server] loading {model_dir}...", file=sys.stderr)
        llm = LLM(model_dir, deployment=args.deployment, quantization=args.quantization, speculative=speculative_flag(args))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_warmup:
        began = time.perf_counter()
        n = llm.engine.warmup()
        print(f"[server] warm-up: {n} compilations, {llm.engine.programs_loaded} programs loaded in "
              f"{time.perf_counter() - began:.1f}s "
              f"(cache: {args.compilation_cache_dir or 'off'})", file=sys.stderr)
    # vLLM's naming: the model as given on the command line; its directory name is accepted too
    names = args.served_model_name or [args.model or model_dir.name]
    aliases = () if args.served_model_name else {model_dir.resolve().name, str(model_dir.resolve())}
    keys = args.api_key or ([os.environ["JAXSEEK_API_KEY"]] if os.environ.get("JAXSEEK_API_KEY") else [])
    server = Server(llm, names, args.default_max_tokens, aliases, keys, args.max_request_body_bytes)
    print(f"[server] serving {', '.join(repr(n) for n in names)} on http://{args.host}:{args.port}/v1 "
          f"(started in {time.perf_counter() - start:.1f}s{', API key required' if keys else ''})", file=sys.stderr)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
