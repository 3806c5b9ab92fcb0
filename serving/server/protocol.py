"""The OpenAI request protocol: a raw body -> validated sampling parameters and prompt token ids.

Everything here is a plain function of the body and the model's facts, run in a worker thread
(`Protocol.prepare`), never on the event loop: parsing a 10 MB body or tokenizing a long prompt
must not stall other clients. Every malformed body becomes an `ApiError` (OpenAI's error JSON),
never an exception that would reach the HTTP layer as a 500.
"""

from __future__ import annotations

import dataclasses
import json

import jinja2

from serving.sampling import MAX_LOGPROBS, SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "stream", "stream_options", "n", "best_of", "logprobs", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias", "user", "return_token_ids",
                   "include_stop_str_in_output", "response_format"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "suffix"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                 "parallel_tool_calls", "metadata", "store", "service_tier"}
# OpenAI fields accepted only at the value that means "off" (anything else: 400 unsupported, naming it)
NEUTRAL = {"best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none", "auto"),
           "response_format": (None, {"type": "text"})}
MAX_N = 16  # choices per prompt
ROLES = ("system", "developer", "user", "assistant", "tool")


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


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
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
                 aliases=(), default_max_tokens: int = 16):
        """tokenizer: serving.api.Tokenizer or None (token-id prompts only)."""
        self.tokenizer, self.context_len, self.vocab_size, self.bos = tokenizer, context_len, vocab_size, bos
        self.served_names, self.accepted = list(served_names), set(served_names) | set(aliases)
        self.default_max_tokens = default_max_tokens
        # No token covers more characters than its vocabulary entry (+1 for a joining space), so a text
        # longer than context x that cannot fit and is refused without tokenizing it.
        self.chars_per_token = 1 + max((len(t) for t in self.tokenizer.tok.get_vocab(True)), default=1) \
            if self.tokenizer else 1

    def prepare(self, raw: bytes, chat: bool) -> Prepared:
        body = parse_json(raw)
        model = body.get("model")
        if model is not None and model not in self.accepted:
            raise ApiError(404, f"The model '{model}' does not exist (this server serves "
                           f"{', '.join(repr(n) for n in self.served_names)})", "model", "model_not_found")
        allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0], "unknown_parameter")
        for name, ok in NEUTRAL.items():
            if name in body and not is_neutral(body[name], ok):
                hint = " (JSON mode is not implemented)" if name == "response_format" else ""
                raise bad(f"'{name}'={body[name]!r} is not supported by this server (only {ok[-1]!r} is){hint}",
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
        base, stops, stream, options = self._sampling(body, chat, logprobs)
        prompts = [self._chat_ids(body.get("messages"))] if chat else self._prompts(body.get("prompt"))
        max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
            else body.get("max_tokens")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens <= 0):
            raise bad(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
        params = []
        for ids in prompts:
            room = self.context_len - len(ids)
            # not given: chat generates until EOS or the context (as vLLM and OpenAI), completions
            # --default-max-tokens (16, OpenAI's), within the context
            want = max_tokens if max_tokens is not None else (room if chat else min(self.default_max_tokens, room))
            if len(ids) + max(want, 1) > self.context_len:
                asked = f"{want} in the completion" if max_tokens is not None else "at least 1 to generate"
                raise bad(f"This model's maximum context length is {self.context_len} tokens. However, you requested "
                          f"{len(ids) + max(want, 1)} tokens ({len(ids)} in the "
                          f"{'messages' if chat else 'prompt'}, {asked}). Please reduce the length of the "
                          f"{'messages' if chat else 'prompt'} or the completion.",
                          "max_tokens" if max_tokens is not None and len(ids) < self.context_len
                          else ("messages" if chat else "prompt"), "context_length_exceeded")
            params.append(dataclasses.replace(base, max_tokens=want))
        return Prepared(prompts, params, n, stops, stream, options.get("include_usage", False),
                        options.get("continuous_usage_stats", False),
                        _flag(body, "return_token_ids") or self.tokenizer is None, echo, logprobs, chat)

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
                   include_stop_str_in_output=_flag(body, "include_stop_str_in_output"))
        defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0,  # OpenAI's defaults (temperature 1: sampling)
                    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
        raw = {k: (defaults[k] if v is None and k in defaults else v) for k, v in raw.items()}
        try:
            params = SamplingParams(**raw)
            params.check_vocabulary(self.vocab_size)
        except (TypeError, ValueError) as e:
            field = next((f for f in raw if str(e).startswith(f)), None)
            raise bad(str(e), field) from None
        return params, stops, stream, options

    # -- prompts --
    def _text_ids(self, text: str, param: str) -> list[int]:
        if self.tokenizer is None:
            raise bad(f"this model has no tokenizer.json: send {param} as token ids", param)
        if len(text) > self.context_len * self.chars_per_token:
            raise bad(f"This model's maximum context length is {self.context_len} tokens, and the {param} has "
                      f"{len(text)} characters, more than that many tokens can hold", param,
                      "context_length_exceeded")
        return ([self.bos] if self.bos is not None else []) + self.tokenizer.encode(text)

    def _prompts(self, prompt) -> list[list[int]]:
        """OpenAI's prompt forms: a string, a list of token ids, a list of strings, a list of token-id lists.
        Token ids are checked (vocabulary, length) by the engine's own validation."""
        def is_ids(p) -> bool:
            return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

        def one(p) -> list[int]:
            if isinstance(p, str):
                if not p:
                    raise bad("the prompt is empty", "prompt")
                return self._text_ids(p, "prompt")
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

    def _chat_ids(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list", "messages",
                      "missing_required_parameter" if messages is None else "invalid_value")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
            if m["role"] not in ROLES:
                raise bad(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                       for p in content):
                    raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content",
                              "unsupported")
                content = "".join(p["text"] for p in content)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
            # OpenAI's developer messages are the system messages of newer models; templates know "system"
            clean.append({**m, "role": "system" if m["role"] == "developer" else m["role"], "content": content})
        if self.tokenizer is None:
            raise bad("chat needs the checkpoint's tokenizer.json and chat template", "messages")
        if sum(len(m["content"]) for m in clean) > self.context_len * self.chars_per_token:
            raise bad(f"This model's maximum context length is {self.context_len} tokens; the messages are longer",
                      "messages", "context_length_exceeded")
        try:
            text = self.tokenizer.apply_chat_template(clean)
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
            raise bad(f"the chat template rejected the messages: {e}", "messages") from None
        for i, m in enumerate(clean):  # a role the template ignores must not vanish silently
            if m["role"] == "tool" and m["content"] and m["content"] not in text:
                raise bad(f"messages[{i}]: this model's chat template has no place for role 'tool' messages",
                          f"messages[{i}].role", "unsupported")
        return self.tokenizer.tok.encode(text, add_special_tokens=False).ids
