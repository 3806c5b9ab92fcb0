"""The Python API, as vLLM users know it: LLM, SamplingParams, generate / stream / chat / stats."""

from __future__ import annotations

import argparse

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp

from serving.detokenizer import Detokenizer, text_ids
from serving.disagg import DisaggEngine, build
from serving.engine import build_engine
from serving.sampling import SamplingParams
from sharding.deployment import Deployment, Disaggregated, read, with_serving

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "jaxseek-tiny"


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    cached_tokens: int = 0


@dataclasses.dataclass
class Delta:
    """One streamed piece of a request's output."""
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None


class Tokenizer:
    """The checkpoint's tokenizer.json (HF `tokenizers`) and its chat template (tokenizer_config.json)."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer as HFTokenizer
        self.tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = model_dir / "tokenizer_config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            template: str | None = None, **kwargs) -> str:
        """The prompt text, as transformers renders it: the template (the checkpoint's, or `template`)
        in jinja's immutable sandbox, with messages, tools and kwargs (e.g. thinking=True).
        continue_final_message: the last (assistant) message is left open for the model to go on."""
        template = template or self.config.get("chat_template")
        if not template:
            raise ValueError("this model's tokenizer_config.json has no chat_template")
        text = _compiled_template(template).render(
            messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt and not
            continue_final_message, bos_token=self.config.get("bos_token", ""),
            eos_token=self.config.get("eos_token", ""), **kwargs)
        if continue_final_message:  # cut after the final message's content, as transformers does
            final = messages[-1].get("content") or ""
            at = text.rfind(final.strip()) if final.strip() else -1
            if at < 0:
                raise ValueError("continue_final_message: the chat template did not render the final message's "
                                 "content as given, so it cannot be continued")
            text = text[:at + len(final.strip())]
        return text


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """A chat template compiled in transformers' environment: sandboxed (a template is code), its
    tojson and helpers."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def add_speculative_flags(ap) -> None:
    """--speculative-tokens K / --no-speculative (python -m serving.generate and serving.server)."""
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--speculative-tokens", type=int, metavar="K",
                       help="MTP speculative decoding: draft K tokens per step, verified in the next (default: "
                            "the deployment's; 1 where the checkpoint has MTP weights)")
    group.add_argument("--no-speculative", action="store_true", help="decode without MTP drafts")


def add_scheduling_flags(ap) -> None:
    """--async-scheduling / --no-async-scheduling (vLLM's flag; python -m serving.generate and serving.server)."""
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="schedule and dispatch step N + 1 while step N runs (default: the deployment's "
                         "serving.async_scheduling, on); --no-async-scheduling reads each step before the next")


def speculative_flag(args):
    """The flags above -> LLM's `speculative` argument."""
    if args.no_speculative:
        return None
    return "auto" if args.speculative_tokens is None else {"method": "mtp", "num_tokens": args.speculative_tokens}


class LLM:
    def __init__(self, model_path=None, deployment=None, dtype=None, quantization=None, speculative="auto",
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 async_scheduling: bool | None = None):
        """model_path: a HF checkpoint dir or one written by DeepseekV3.save (default: the embedded
        tiny model). deployment: a deployment file or sharding.deployment.Deployment (default: every
        device present). dtype: activations and non-FP8 weights (default float32 on CPU, bfloat16
        elsewhere). quantization: "fp8" | "none" (default: the deployment's, else fp8 on a GPU for an
        FP8 checkpoint, none otherwise). speculative: {"method": "mtp", "num_tokens": k} (MTP drafts k
        tokens per step, verified in the next), None (off) or "auto" (the deployment's section; by
        default 1 token where the checkpoint has MTP weights). max_model_len (default: the model's
        context), max_num_batched_tokens (per rank and step) and async_scheduling (step N + 1
        dispatched while step N runs) override the deployment's serving."""
        from model import ModelConfig
        from model.quant import check_quantization
        if quantization is not None:
            check_quantization(quantization)
        path = Path(model_path) if model_path is not None else DEFAULT_MODEL
        cfg = ModelConfig.from_json(path / "config.json")
        if deployment is None:  # every device present
            deployment = Deployment.for_devices(len(jax.devices()), cfg.n_routed_experts)
        elif not isinstance(deployment, (Deployment, Disaggregated)):
            deployment = read(deployment)
        deployment = with_serving(deployment, max_model_len=max_model_len,
                                  max_num_batched_tokens=max_num_batched_tokens, async_scheduling=async_scheduling)
        if speculative != "auto":  # both slices of a disaggregated deployment
            def speculating(d):
                return dataclasses.replace(d, speculative=speculative)
            deployment = (dataclasses.replace(deployment, prefill=speculating(deployment.prefill),
                                              decode=speculating(deployment.decode))
                          if isinstance(deployment, Disaggregated) else speculating(deployment))
        platform = (deployment.prefill if isinstance(deployment, Disaggregated) else deployment).platform_for()
        dtype = dtype or (jnp.float32 if platform == "cpu" else jnp.bfloat16)  # decided once, from the deployment
        self.deployment = deployment
        if isinstance(deployment, Disaggregated):
            self.engine = build(path, deployment, dtype, quantization=quantization)
            self.spare = self.engine.spare
        else:
            self.engine = build_engine(path, deployment, dtype, quantization=quantization)
            self.spare = [d for d in jax.devices() if d not in set(self.engine.mesh.devices.flat)]
        self.tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None

    # ---- prompts -----------------------------------------------------------------------------------
    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need the checkpoint's tokenizer.json; pass token ids instead")
            bos = self.engine.net.config.bos_token_id
            return ([bos] if bos is not None else []) + self.tokenizer.encode(prompt)
        return list(prompt)

    def _text(self, ids: list[int], skip_special_tokens: bool = True) -> str | None:
        return self.tokenizer.decode(ids, skip_special_tokens) if self.tokenizer else None

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("chat needs the checkpoint's tokenizer.json and chat template")
        return self.tokenizer.tok.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False).ids

    @staticmethod
    def _params(params) -> SamplingParams:
        if params is None:
            return SamplingParams()
        return params if isinstance(params, SamplingParams) else SamplingParams.from_dict(dict(params))

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, prompts, params=None, progress: bool = False) -> list[RequestOutput]:
        """Prompts: text, token-id lists, or a list of either; params: one SamplingParams (or dict) for
        all, or one per prompt. A bad prompt gets an output with finish_reason "error" and the
        reason; the others complete. progress: a status line on stderr while it runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        per_prompt = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        outs, live = [], {}
        for prompt, p in zip(prompts, per_prompt):
            try:
                ids = self._ids(prompt)
                req = self.engine.add_request(ids, self._params(p))
                live[req.id] = len(outs)
                outs.append(RequestOutput(req.id, ids, [], None, None))
            except ValueError as e:
                outs.append(RequestOutput("", [], [], None, "error", error=str(e)))
        total, shown = len(live), 0.0
        while live:
            if progress and time.monotonic() - shown > 0.5:
                shown = time.monotonic()
                print(f"\r[generate] {total - len(live)}/{total} requests done, "
                      f"{self.engine.counters['generated_tokens']} tokens", end="", file=sys.stderr, flush=True)
            for event in self.engine.step():
                if event.finished and event.request.id in live:
                    req = event.request
                    out = outs[live.pop(req.id)]
                    out.token_ids, out.finish_reason, out.cached_tokens = req.output, req.finish_reason, req.cached
                    out.text = self._text(text_ids(req.output, req.finish_reason,
                                                   req.params.include_stop_str_in_output),
                                          req.params.skip_special_tokens)
        if progress:
            print(f"\r[generate] {total}/{total} requests done", file=sys.stderr)
        return outs

    def chat(self, messages: list[dict], params=None) -> RequestOutput:
        return self.generate([self.chat_prompt(messages)], params)[0]

    def stream(self, prompt, params=None) -> Iterator[Delta]:
        """Yields each new token (and the text it completes) as the engine produces it."""
        req = self.engine.add_request(self._ids(prompt), self._params(params))
        detok = Detokenizer(self.tokenizer, req.params.skip_special_tokens)
        while req.finish_reason is None:
            for event in self.engine.step():
                if event.request is req:
                    shown = text_ids(event.new_tokens, req.finish_reason, req.params.include_stop_str_in_output)
                    yield Delta(req.id, event.new_tokens, detok.add(shown, final=event.finished), req.finish_reason)

    def stats(self) -> dict:
        return self.engine.stats()

    def resize(self, dp: int | None = None, *, prefill: int | None = None, decode: int | None = None) -> None:
        """Elastic capacity while serving: dp ranks for a single-slice deployment, or per slice for a
        disaggregated one. Leaving ranks stop taking requests and move theirs (KV blocks included) to
        the staying ranks; their devices become spare. No request is lost or changes a token."""
        if isinstance(self.engine, DisaggEngine):
            if dp is not None:
                raise ValueError("a disaggregated deployment resizes per slice: resize(prefill=..., decode=...)")
            self.engine.resize(prefill, decode)
        elif prefill is not None or decode is not None:
            raise ValueError(f"deployment {self.deployment.name} has one slice: resize(dp=...)")
        elif dp is not None:
            self.engine.resize_dp(dp, self.spare)
