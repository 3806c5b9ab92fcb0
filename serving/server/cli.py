"""python -m serving.server: vLLM's flags where they exist (docs/SERVER.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

from serving import multihost
from serving.api import add_scheduling_flags, add_speculative_flags, speculative_flag
from serving.server.app import DEFAULT_MAX_BODY_BYTES
from serving.server.parsers import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, REASONING_PARSERS, THINK_END,
                                    THINK_START, TOOL_CALL_PARSERS, TOOL_SEP)
from serving.server.protocol import GENERATION_DEFAULTS, Options
from serving.stats import xla_cache_hits, xla_compilations


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
    add_scheduling_flags(ap)
    ap.add_argument("--quantization", choices=("fp8", "none"),
                    help="weights: fp8 or none (default: the deployment's, else fp8 on a GPU for an FP8 checkpoint)")
    ap.add_argument("-tp", "--tensor-parallel-size", type=int, metavar="N",
                    help="tensor-parallel ranks of the deployment's mesh (default: the deployment's)")
    ap.add_argument("-dp", "--data-parallel-size", type=int, metavar="N",
                    help="data-parallel (attention) ranks of the deployment's mesh (default: the deployment's)")
    ap.add_argument("--enable-expert-parallel", action="store_true",
                    help="accepted for vLLM's command lines: routed experts are always expert-parallel over the mesh")
    ap.add_argument("--max-model-len", type=int, metavar="N",
                    help="the context length (default: the deployment's, else the model's own)")
    ap.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                    help="tokens per dp rank and engine step: running decodes first, the rest prefill chunks "
                         "(default: the deployment's serving.max_num_batched_tokens)")
    ap.add_argument("--seed", type=int, help="requests without a seed draw theirs from this seed, in arrival order")
    ap.add_argument("--trust-remote-code", action="store_true", help="accepted for vLLM's command lines (no effect)")
    ap.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                    help="default sampling parameters from generation_config.json: auto (the model's), a folder "
                         "holding one, or vllm (none: OpenAI's defaults)")
    ap.add_argument("--chat-template", metavar="FILE|TEMPLATE",
                    help="a chat template (a file or the template itself) instead of the checkpoint's")
    ap.add_argument("--reasoning-parser", choices=REASONING_PARSERS,
                    help="split <think>...</think> into message.reasoning_content (deepseek_v3: when the request's "
                         "chat_template_kwargs.thinking is true)")
    ap.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, help="read the model's tool-call tokens")
    ap.add_argument("--enable-auto-tool-choice", action="store_true",
                    help='tool_choice "auto": tool calls parsed from the output by --tool-call-parser')
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
    multihost.add_flags(ap)  # process 0 serves HTTP; the others follow its steps (docs/SERVER.md)
    return ap


def main(argv=None) -> int:
    start = time.perf_counter()
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[server] %(message)s")
    if args.default_max_tokens < 1 or args.max_request_body_bytes < 1:
        ap.error("--default-max-tokens and --max-request-body-bytes must be >= 1")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        ap.error("--enable-auto-tool-choice needs --tool-call-parser")
    import jax
    try:
        multi = multihost.join(args)
        cache_dir = None if multihost.uncached(multi) else args.compilation_cache_dir
        use_compilation_cache(cache_dir)
        if multi and jax.process_index() != 0:
            multihost.beat()
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ["JAXSEEK_SERIALIZED_STEPS"] = "1" if args.serialized_steps else "0"
    lead = jax.process_index() == 0
    if multi:
        print(f"[server] process {jax.process_index()} of {jax.process_count()} joined the job "
              f"({jax.device_count()} devices, {jax.local_device_count()} here)", file=sys.stderr)

    import uvicorn

    from serving.api import DEFAULT_MODEL, LLM, Tokenizer
    from serving.server.app import Server
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    try:  # (the flags are checked before the model loads: a mistake fails in a second, not minutes)
        options = Options(args.reasoning_parser, args.tool_call_parser if args.enable_auto_tool_choice else None,
                          chat_template(args.chat_template), generation_defaults(args.generation_config, model_dir))
        check_parsers(Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None, args)
        print(f"[server] loading {model_dir}...", file=sys.stderr)
        llm = LLM(model_dir, deployment=deployment(args, model_dir), quantization=args.quantization,
                  speculative=speculative_flag(args), max_num_batched_tokens=args.max_num_batched_tokens,
                  async_scheduling=args.async_scheduling)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        llm.engine.seeds = random.Random(args.seed)
    if not args.no_warmup:
        began = time.perf_counter()
        if llm.tokenizer is not None:  # llguidance's view of the vocabulary, for the first grammar (seconds at 129k)
            llm.engine.grammars.tokenizer  # noqa: B018
        xla = xla_compilations()
        n = llm.engine.warmup(background=True)  # the buckets that hold any batch now, the rest while serving
        warming = getattr(getattr(llm.engine, "runner", None), "warming", None)
        ready = f"; {warming.ready} of {warming.total} programs ready" if warming is not None else ""
        print(f"[server] warm-up: {n} compilations, {llm.engine.programs_loaded} programs loaded in "
              f"{time.perf_counter() - began:.1f}s "
              f"(cache: {cache_dir or 'off'}{ready}; XLA compilations in the process: {xla} before, "
              f"{xla_compilations()} after, {xla_cache_hits()} programs from the cache)", file=sys.stderr)
    steps = multihost.Shared("step") if multi else None
    if not lead:  # no HTTP here: the same steps as process 0, on the inputs it publishes
        return multihost.follow(llm.engine, steps)
    # vLLM's naming: the model as given on the command line; its directory name is accepted too
    names = args.served_model_name or [args.model or model_dir.name]
    aliases = () if args.served_model_name else {model_dir.resolve().name, str(model_dir.resolve())}
    keys = args.api_key or ([os.environ["JAXSEEK_API_KEY"]] if os.environ.get("JAXSEEK_API_KEY") else [])
    server = Server(llm, names, args.default_max_tokens, aliases, keys, args.max_request_body_bytes, options, steps)
    if multi:
        multihost.watch(server)
    print(f"[server] serving {', '.join(repr(n) for n in names)} on http://{args.host}:{args.port}/v1 "
          f"(started in {time.perf_counter() - start:.1f}s{', API key required' if keys else ''})", file=sys.stderr)
    if multi:  # uvicorn re-raises the SIGTERM it drained on: let it land here, so that process 0
        # exits 0 after the others (jax.distributed's shutdown barrier), not killed before they leave
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)
    if multi:  # (the engine thread has stopped every process: its last message said so)
        s, c = llm.engine.stats(), llm.engine.counters
        n, sent = c["prefill_steps"] + c["decode_steps"], server.worker.published
        print(f"[server] process 0: stopped after {n} steps; kv blocks in use {s['kv_blocks_used']}; {sent} step "
              f"messages published, {steps.sent_bytes / max(1, sent):.0f} bytes and "
              f"{steps.seconds * 1e3 / max(1, sent):.2f} ms each (a step: "
              f"{(c['prefill_s'] + c['decode_s']) * 1e3 / max(1, n):.1f} ms){multihost.disk_written(llm.engine)}",
              file=sys.stderr)
    return 0


def deployment(args, model_dir: Path):
    """The deployment, with -tp / -dp / --max-model-len applied (vLLM's flags)."""
    from model import ModelConfig
    from sharding.deployment import Deployment, Disaggregated, read
    if args.tensor_parallel_size is None and args.data_parallel_size is None and args.max_model_len is None:
        return args.deployment
    cfg = ModelConfig.from_json(model_dir / "config.json")
    if args.deployment:
        dep = read(args.deployment)
    else:
        import jax
        dep = Deployment.for_devices(len(jax.devices()), cfg.n_routed_experts)
    if isinstance(dep, Disaggregated):
        if args.tensor_parallel_size or args.data_parallel_size:
            raise ValueError(f"{args.deployment}: -tp / -dp size a single-slice deployment; this one has prefill and "
                             f"decode slices (size them in the file)")
        if args.max_model_len:
            return dataclasses.replace(dep, prefill=_context(dep.prefill, args.max_model_len),
                                       decode=_context(dep.decode, args.max_model_len))
        return dep
    dp, tp = args.data_parallel_size or dep.dp, args.tensor_parallel_size or dep.tp
    if (dp, tp) != (dep.dp, dep.tp):
        redundant = dep.redundant_experts if (cfg.n_routed_experts + dep.redundant_experts) % (dp * tp) == 0 \
            else (-cfg.n_routed_experts) % (dp * tp)  # the fewest that divide over the new EP size
        dep = dataclasses.replace(dep, dp=dp, tp=tp, redundant_experts=redundant)
    return _context(dep, args.max_model_len) if args.max_model_len else dep


def _context(dep, max_model_len: int):
    if max_model_len < 2:
        raise ValueError(f"--max-model-len {max_model_len} must be >= 2")
    return dataclasses.replace(dep, serving=dataclasses.replace(dep.serving, max_model_len=max_model_len))


def chat_template(given: str | None) -> str | None:
    """--chat-template: a file's text, or the template itself (vLLM's rule)."""
    if given is None:
        return None
    path = Path(given)
    if path.is_file():
        return path.read_text()
    if "{" not in given:
        raise ValueError(f"--chat-template {given}: no such file (and not a template: it has no '{{')")
    return given


def generation_defaults(source: str, model_dir: Path) -> dict:
    """generation_config.json's sampling defaults (vLLM's --generation-config: auto, vllm or a folder)."""
    if source == "vllm":
        return {}
    path = (model_dir if source == "auto" else Path(source)) / "generation_config.json"
    if not path.is_file():
        if source != "auto":
            raise ValueError(f"--generation-config {source}: no generation_config.json there")
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    defaults = {k: raw[k] for k in GENERATION_DEFAULTS if raw.get(k) is not None}
    if defaults:
        print(f"[server] default sampling parameters from {path}: {defaults} (--generation-config vllm ignores them)",
              file=sys.stderr)
    return defaults


def check_parsers(tokenizer, args) -> None:
    """The parsers' markers must be text this tokenizer spells (else the parser could never match)."""
    markers = ([THINK_START, THINK_END] if args.reasoning_parser else []) + \
        ([CALLS_BEGIN, CALL_BEGIN, TOOL_SEP, CALL_END, CALLS_END] if args.tool_call_parser else [])
    if markers and tokenizer is None:
        raise ValueError("--reasoning-parser / --tool-call-parser need the checkpoint's tokenizer.json")
    for m in markers:
        if tokenizer.decode(tokenizer.encode(m), skip_special_tokens=False) != m:
            flag = "--reasoning-parser" if m in (THINK_START, THINK_END) else "--tool-call-parser"
            raise ValueError(f"{flag}: this model's tokenizer cannot spell {m!r}, which the parser reads")
