"""The OpenAI request protocol: a raw body -> validated sampling parameters and prompt token ids.

Everything here is a plain function of the body and the model's facts, run in a worker thread
(`Protocol.prepare`), never on the event loop: parsing a 10 MB body or tokenizing a long prompt
must not stall other clients. Every malformed body becomes an `ApiError` (OpenAI's error JSON),
never an exception that would reach the HTTP layer as a 500.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading

from serving.sampling import MAX_LOGPROBS, SamplingParams
from serving.server import chat as chatting
from serving.server.constraints import compile_check, requested
from serving.server.errors import ApiError, bad
from serving.server.parsers import THINK_END, THINK_START
from serving.structured import StructuredOutputs

log = logging.getLogger("serving.server")

SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "stream", "stream_options", "n", "best_of", "logprobs", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias", "user", "return_token_ids",
                   "include_stop_str_in_output", "min_tokens", "skip_special_tokens", "response_format",
                   "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                   "prompt_logprobs", "add_special_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "suffix"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                 "parallel_tool_calls", "metadata", "store", "service_tier", "chat_template_kwargs",
                                 "add_generation_prompt", "continue_final_message", "chat_template"}
# fields accepted only at the value that means "off" (anything else: 400 unsupported, naming it)
NEUTRAL = {"best_of": (None, 1), "suffix": (None, ""), "prompt_logprobs": (None,)}
MAX_N = 16  # choices per prompt
# what a checkpoint's generation_config.json may set as defaults (vLLM's list; max_new_tokens -> max_tokens)
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")
_warned: set[str] = set()  # unknown request fields already logged (once per name, as vLLM's warning)
MAX_WARNED = 256  # names remembered (and logged): clients inventing fields cannot grow the set or the log
_warned_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Options:
    """What the server's flags decide for every request (docs/SERVER.md)."""
    reasoning_parser: str | None = None  # --reasoning-parser
    tool_parser: str | None = None  # --tool-call-parser, with --enable-auto-tool-choice (None: no "auto")
    chat_template: str | None = None  # --chat-template (None: the checkpoint's)
    defaults: dict = dataclasses.field(default_factory=dict)  # generation_config.json (--generation-config auto)


@dataclasses.dataclass
class Prepared:
    """A validated request: one engine request per (prompt, choice)."""
    prompts: list[list[int]]
    params: list[SamplingParams]  # per prompt (max_tokens depends on the prompt's length)
    n: int
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream: a last chunk with the usage
    continuous_usage: bool  # stream: usage in every chunk (vLLM's continuous_usage_stats)
    return_token_ids: bool
    echo: bool
    logprobs: int | None  # top logprobs per token (None: no logprobs)
    chat: bool
    reasoning: bool = False  # chat: the output's reasoning is parsed out (--reasoning-parser)
    tools: chatting.ToolChoice | None = None  # chat: how the output's tool calls are read


def is_neutral(value, ok: tuple) -> bool:
    for v in ok:
        if v is None or isinstance(v, bool) or isinstance(value, bool):
            if value is v:
                return True
        elif isinstance(v, (int, float)) and isinstance(value, (int, float)):
            if value == v:
                return True
        elif type(value) is type(v) and value == v:
            return True
    return False


def _integer(body: dict, name: str, low: int, high: int, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be a boolean, got {value!r}", name)
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object whose strings are all valid Unicode (a lone UTF-16 surrogate, from a
    \\ud800 escape, cannot be tokenized or sent back as UTF-8)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    stack = [(body, "")]
    while stack:  # iterative: the body may be nested as deep as the parser allows
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where or 'the body'} holds a lone UTF-16 surrogate (not valid Unicode)",
                               where or None, "invalid_json") from None
        elif isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in value.items())
            stack.extend((k, where) for k in value)
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
    return body


class Protocol:
    """The model's facts a request is checked against, and the checks."""

    def __init__(self, tokenizer, context_len: int, vocab_size: int, bos: int | None, served_names: list[str],
                 aliases=(), default_max_tokens: int = 16, grammars=None, options: Options = Options()):
        """tokenizer: serving.api.Tokenizer or None (token-id prompts only); grammars: the engine's
        serving.structured.Grammars (None: no structured outputs)."""
        self.tokenizer, self.context_len, self.vocab_size, self.bos = tokenizer, context_len, vocab_size, bos
        self.served_names, self.accepted = list(served_names), set(served_names) | set(aliases)
        self.default_max_tokens, self.grammars, self.options = default_max_tokens, grammars, options
        # No token covers more characters than its vocabulary entry (+1 for a joining space), so a text
        # longer than context x that cannot fit and is refused without tokenizing it.
        self.chars_per_token = 1 + max((len(t) for t in self.tokenizer.tok.get_vocab(True)), default=1) \
            if self.tokenizer else 1
        specials = {t.content for t in tokenizer.tok.get_added_tokens_decoder().values() if t.special} \
            if tokenizer else set()
        self.special_think = bool({THINK_START, THINK_END} & specials)  # the markers' text needs the specials kept
        self.special_calls = any(t.startswith("<｜tool") for t in specials)

    def prepare(self, raw: bytes, chat: bool) -> Prepared:
        body = parse_json(raw)
        model = body.get("model")
        if model is not None and model not in self.accepted:
            raise ApiError(404, f"The model '{model}' does not exist (this server serves "
                           f"{', '.join(repr(n) for n in self.served_names)})", "model", "model_not_found")
        unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
        with _warned_lock:
            new = [f for f in unknown if f not in _warned][:max(0, MAX_WARNED - len(_warned))]
            _warned.update(new)
        for field in new:  # accepted, as vLLM does, and said once per field name
            log.warning("request field %r is not supported by this server and is ignored", field)
        for name, ok in NEUTRAL.items():
            if name in body and not is_neutral(body[name], ok):
                raise bad(f"'{name}'={body[name]!r} is not supported by this server (only {ok[-1]!r} is)",
                          name, "unsupported")
        n = _integer(body, "n", 1, MAX_N, 1)
        echo = not chat and _flag(body, "echo")
        if chat:
            logprobs = _integer(body, "top_logprobs", 0, MAX_LOGPROBS, 0) if _flag(body, "logprobs") else None
            if body.get("top_logprobs") is not None and logprobs is None:
                raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        else:
            logprobs = _integer(body, "logprobs", 0, MAX_LOGPROBS)
        if echo and logprobs is not None:
            raise bad("echo with logprobs (the prompt's logprobs) is not supported by this server", "echo",
                      "unsupported")
        spec, field = requested(body)
        base, stops, stream, options = self._sampling(body, chat, logprobs)
        reasoning, tools = False, None
        if chat:
            prompt, tools, reasoning, spec, field = self._chat(body, spec, field)
            prompts = [prompt]
        else:
            prompts = self._prompts(body.get("prompt"), _flag(body, "add_special_tokens", True))
        if spec is not None:
            if self.grammars is None:
                raise bad(f"{field}: structured outputs need the checkpoint's tokenizer.json", field, "unsupported")
            compile_check(self.grammars, spec, field)
        skip = base.skip_special_tokens and not ((reasoning and self.special_think) or
                                                 (tools is not None and tools.mode == "auto" and self.special_calls))
        base = dataclasses.replace(base, structured_outputs=spec, skip_special_tokens=skip)
        max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
            else body.get("max_tokens")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens <= 0):
            raise bad(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
        default = self.options.defaults.get("max_new_tokens")
        params = []
        for ids in prompts:
            room = self.context_len - len(ids)
            # not given: the checkpoint's max_new_tokens, else chat generates until EOS or the context (as
            # vLLM and OpenAI), completions --default-max-tokens (16, OpenAI's), within the context
            want = max_tokens if max_tokens is not None else min(default or (room if chat else self.default_max_tokens),
                                                                  room)
            if len(ids) + max(want, 1) > self.context_len:
                asked = f"{want} in the completion" if max_tokens is not None else "at least 1 to generate"
                raise bad(f"This model's maximum context length is {self.context_len} tokens. However, you requested "
                          f"{len(ids) + max(want, 1)} tokens ({len(ids)} in the "
                          f"{'messages' if chat else 'prompt'}, {asked}). Please reduce the length of the "
                          f"{'messages' if chat else 'prompt'} or the completion.",
                          "max_tokens" if max_tokens is not None and len(ids) < self.context_len
                          else ("messages" if chat else "prompt"), "context_length_exceeded")
            if base.min_tokens > want:
                raise bad(f"min_tokens ({base.min_tokens}) is more than the {want} tokens this request may generate",
                          "min_tokens")
            params.append(dataclasses.replace(base, max_tokens=want))
        return Prepared(prompts, params, n, stops, stream, options.get("include_usage", False),
                        options.get("continuous_usage_stats", False),
                        _flag(body, "return_token_ids") or self.tokenizer is None, echo, logprobs, chat,
                        reasoning, tools)

    def _chat(self, body: dict, spec, field):
        """-> (prompt ids, tool choice, reasoning parsed, the constraint and its field): the prompt
        rendered by the chat template; "required" and named tool choices become the constraint; with
        a reasoning parser the constraint starts after the reasoning (vLLM's behaviour)."""
        tools = chatting.check_tools(body.get("tools"))
        choice = chatting.resolve_tool_choice(body.get("tool_choice"), tools, self.options.tool_parser,
                                              body.get("parallel_tool_calls") is not False)
        if choice.schema is not None:
            if spec is not None:
                raise bad(f"tool_choice {choice.mode!r} constrains the output already; drop {field}", field)
            # compact JSON: a model cannot run a call out on whitespace between its tokens
            spec, field = StructuredOutputs(json=choice.schema, disable_any_whitespace=True), "tools"
        template = chatting.template_options(body)
        messages = chatting.check_messages(body.get("messages"))
        if self.tokenizer is None:
            raise bad("chat needs the checkpoint's tokenizer.json and chat template", "messages")
        if sum(len(m["content"]) for m in messages) > self.context_len * self.chars_per_token:
            raise bad(f"This model's maximum context length is {self.context_len} tokens; the messages are longer",
                      "messages", "context_length_exceeded")
        text = chatting.render(self.tokenizer, messages, tools, template, self.options.chat_template,
                               callable_tools=choice.mode != "none")
        thinking = template["kwargs"].get("thinking") or template["kwargs"].get("enable_thinking")
        parser = self.options.reasoning_parser
        # the prompt may close the reasoning itself (V3.1's non-thinking mode ends it with </think>)
        reasoning = (parser == "deepseek_r1" or (parser == "deepseek_v3" and bool(thinking))) and \
            text.rfind(THINK_END) <= text.rfind(THINK_START)
        if reasoning and spec is not None:
            spec = dataclasses.replace(spec, after=tuple(self.tokenizer.encode(THINK_END)))
        return self.tokenizer.tok.encode(text, add_special_tokens=False).ids, choice, reasoning, spec, field

    def _sampling(self, body: dict, chat: bool, logprobs: int | None):
        stop = body.get("stop")
        if stop is None:
            stops = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = tuple(stop)
        else:
            raise bad(f"stop must be a string or a list of strings, got {stop!r}", "stop")
        if any(not s for s in stops):
            raise bad("stop strings must not be empty", "stop")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in stop_ids):
            raise bad(f"stop_token_ids must be a list of integers, got {stop_ids!r}", "stop_token_ids")
        bias = body.get("logit_bias") or {}
        if not isinstance(bias, dict):
            raise bad(f"logit_bias must map token ids to numbers, got {bias!r}", "logit_bias")
        try:
            bias = {int(k): v for k, v in bias.items()}
        except ValueError:
            raise bad(f"logit_bias keys must be token ids, got {sorted(bias)!r}", "logit_bias") from None
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bias.values()):
            raise bad("logit_bias values must be numbers", "logit_bias")
        top_k = body.get("top_k")
        if top_k == -1:  # vLLM's "off"
            top_k = 0
        if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > self.vocab_size:
            top_k = 0  # k >= the vocabulary keeps every token (and must fit the engine's int32 array)
        seed = body.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            seed &= 0xFFFFFFFF  # OpenAI takes any 64-bit seed; the sampler's keys are 32-bit
        stream = _flag(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"} or \
                any(not isinstance(v, bool) for v in options.values()):
            raise bad(f"stream_options may hold include_usage and continuous_usage_stats (booleans), got {options!r}",
                      "stream_options")
        if options and not stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        raw = dict(temperature=body.get("temperature"), top_p=body.get("top_p"), top_k=top_k, seed=seed,
                   stop_token_ids=tuple(stop_ids), ignore_eos=_flag(body, "ignore_eos"), logprobs=logprobs,
                   presence_penalty=body.get("presence_penalty"), frequency_penalty=body.get("frequency_penalty"),
                   repetition_penalty=body.get("repetition_penalty"), logit_bias=bias,
                   include_stop_str_in_output=_flag(body, "include_stop_str_in_output"), min_p=body.get("min_p"),
                   min_tokens=body.get("min_tokens"), skip_special_tokens=_flag(body, "skip_special_tokens", True),
                   max_tokens=self.context_len)  # (each prompt's own max_tokens replaces it)
        # OpenAI's defaults (temperature 1: sampling), under the checkpoint's generation_config.json
        defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "min_tokens": 0,
                    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                    **{k: v for k, v in self.options.defaults.items() if k in raw}}
        raw = {k: (defaults[k] if v is None and k in defaults else v) for k, v in raw.items()}
        try:
            params = SamplingParams(**raw)
            params.check_vocabulary(self.vocab_size)
        except (TypeError, ValueError) as e:
            field = next((f for f in raw if str(e).startswith(f)), None)
            raise bad(str(e), field) from None
        return params, stops, stream, options

    # -- prompts --
    def _text_ids(self, text: str, param: str, bos: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise bad(f"this model has no tokenizer.json: send {param} as token ids", param)
        if len(text) > self.context_len * self.chars_per_token:
            raise bad(f"This model's maximum context length is {self.context_len} tokens, and the {param} has "
                      f"{len(text)} characters, more than that many tokens can hold", param,
                      "context_length_exceeded")
        return ([self.bos] if self.bos is not None and bos else []) + self.tokenizer.encode(text)

    def _prompts(self, prompt, bos: bool = True) -> list[list[int]]:
        """OpenAI's prompt forms: a string, a list of token ids, a list of strings, a list of token-id lists.
        Token ids are checked (vocabulary, length) by the engine's own validation. bos: a string gets
        the BOS token in front (vLLM's add_special_tokens)."""
        def is_ids(p) -> bool:
            return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

        def one(p) -> list[int]:
            if isinstance(p, str):
                if not p:
                    raise bad("the prompt is empty", "prompt")
                return self._text_ids(p, "prompt", bos)
            if is_ids(p):
                return p
            raise bad("the prompt is empty" if p == [] else
                      "prompt must be a string, a list of token ids, or a list of either", "prompt", "invalid_type")
        if prompt is None:
            raise bad("'prompt' is a required property", "prompt", "missing_required_parameter")
        if isinstance(prompt, str) or is_ids(prompt):
            return [one(prompt)]
        if isinstance(prompt, list) and prompt:
            return [one(p) for p in prompt]
        raise bad("the prompt is empty" if prompt == [] else
                  "prompt must be a string, a list of token ids, or a list of either", "prompt")
