"""A response under construction: its choices (tokens -> text through the shared incremental
detokenizer, stop strings, stop tokens, logprobs) and the queue their engine updates arrive on."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from serving.detokenizer import Detokenizer, text_ids
from serving.server.errors import ApiError, bad
from serving.server.parsers import Message
from serving.server.protocol import Prepared
from serving.server.worker import EngineWorker, Update

MIN_LOGPROB = -9999.0  # what a token the grammar ruled out (logprob -inf) reports: JSON has no infinity (vLLM's)


class Choice:
    """One choice: its tokens, its text (cut at a stop string) and its logprobs."""

    def __init__(self, index: int, request_id: str, prompt: list[int], params, tokenizer, stops: tuple[str, ...],
                 echo: str, eos: tuple[int, ...]):
        self.index, self.request_id, self.prompt, self.params = index, request_id, prompt, params
        self.detok = Detokenizer(tokenizer, params.skip_special_tokens)
        self.stops, self.echo = stops, echo
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.stop_tokens = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
        self.token_ids: list[int] = []
        self.logprobs: list[tuple[int, float, list]] = []  # (token, logprob, top [(id, logprob)])
        self.text = echo  # the echoed prompt, then the generated text
        self.sent = self.sent_tokens = self.sent_logprobs = 0  # already streamed
        self.checked = len(echo)  # characters of text already searched for stop strings
        self.logprob_offset = len(echo)  # text_offset of the next completions logprob entry
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string (None: EOS)
        self.cached_tokens = 0
        self.parser: Message | None = None  # a streamed chat choice's output parsers (Call.chat_delta)
        self.called = False  # the output held a tool call

    def feed(self, update: Update) -> bool:
        """Takes an update; returns True if a stop string ended the choice (the engine must abort it)."""
        self.token_ids += update.token_ids
        self.cached_tokens = update.cached_tokens
        for token, entry in zip(update.token_ids, update.logprobs or ()):
            self.logprobs.append((token, *entry))
        final = update.finish_reason is not None
        shown = text_ids(update.token_ids, update.finish_reason, self.params.include_stop_str_in_output)
        self.text += self.detok.add(shown, final=final)
        self.finish_reason = update.finish_reason
        if update.finish_reason == "stop" and self.token_ids and self.token_ids[-1] in self.params.stop_token_ids:
            self.stop_reason = self.token_ids[-1]
        if self.stops and len(self.token_ids) <= self.params.min_tokens:  # (vLLM: no stop string before min_tokens)
            self.checked = len(self.text)
        elif self.stops and self.finish_reason != "error":
            start = max(len(self.echo), self.checked - self.longest_stop + 1)
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            self.checked = len(self.text)
            if hits:
                at, stop = min(hits)
                self.text = self.text[:at + (len(stop) if self.params.include_stop_str_in_output else 0)]
                stopped_early = self.finish_reason is None
                self.finish_reason, self.stop_reason = "stop", stop
                return stopped_early
        return False

    def delta(self) -> tuple[str, list[int], list]:
        """Text, tokens and logprobs not streamed yet; while running, holds back a tail that may
        begin a stop string."""
        end = len(self.text)
        if self.finish_reason is None:
            for k in range(min(self.longest_stop - 1, end - self.sent), 0, -1):
                if any(s.startswith(self.text[end - k:]) for s in self.stops):
                    end -= k
                    break
        text = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        tokens, logprobs = self.token_ids[self.sent_tokens:], self.logprobs[self.sent_logprobs:]
        self.sent_tokens, self.sent_logprobs = len(self.token_ids), len(self.logprobs)
        return text, tokens, logprobs


def token_text(tokenizer, token: int) -> str:
    """One token's own text (specials included), or vLLM's "token_id:N" without a tokenizer."""
    if tokenizer is None:
        return f"token_id:{token}"
    return tokenizer.tok.decode([token], skip_special_tokens=False)


def completion_logprobs(tokenizer, entries: list, offset: int) -> tuple[dict, int]:
    """The legacy completions form: tokens, token_logprobs, top_logprobs (the top k and the sampled
    token, as vLLM), text_offset (from `offset` characters into the choice's text); and the offset
    after them."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp, top in entries:
        text, lp = token_text(tokenizer, token), max(lp, MIN_LOGPROB)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({**{token_text(tokenizer, t): max(v, MIN_LOGPROB) for t, v in top}, text: lp})
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def chat_logprobs(tokenizer, entries: list) -> dict:
    def item(token, lp) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": max(lp, MIN_LOGPROB), "bytes": list(text.encode("utf-8", "replace"))}
    return {"content": [{**item(token, lp), "top_logprobs": [item(t, v) for t, v in top]}
                        for token, lp, top in entries]}


class Call:
    """One HTTP request's engine requests (one per prompt and choice) and the queue their updates arrive on."""

    def __init__(self, worker: EngineWorker, request_id: str, prep: Prepared, tokenizer, eos: tuple[int, ...]):
        self.worker, self.prep, self.tokenizer = worker, prep, tokenizer
        self.id = f"{'chatcmpl' if prep.chat else 'cmpl'}-{request_id}"
        self.created = int(time.time())
        engine_id = uuid.uuid4().hex  # the engine's ids stay unique whatever X-Request-Id clients send
        self.choices = []
        for i, (prompt, params) in enumerate(zip(prep.prompts, prep.params)):
            echo = (tokenizer.decode(prompt) if tokenizer else "") if prep.echo else ""
            for j in range(prep.n):
                index = i * prep.n + j
                if params.seed is not None and j:  # n choices of one seeded request must differ
                    params = dataclasses.replace(params, seed=(params.seed + 1) & 0xFFFFFFFF)
                self.choices.append(Choice(index, f"{engine_id}-{index}", prompt, params, tokenizer, prep.stops,
                                           echo, eos))
        for c in self.choices:
            c.parser = self.parser()
        self.by_id = {c.request_id: c for c in self.choices}
        self.live: set[str] = set()
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def _sink(self, update: Update) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, update)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def submit(self, arrival: float) -> None:
        self.live = set(self.by_id)
        fut = self.worker.submit([(c.request_id, c.prompt, c.params) for c in self.choices], self._sink, arrival)
        try:
            await asyncio.wrap_future(fut)
        except ValueError as e:  # the engine's own validation (token ids, lengths)
            self.live.clear()
            message = str(e)
            if message.startswith("request ") and ": " in message:  # the engine names its internal id
                message = message.split(": ", 1)[1]
            param = "messages" if self.prep.chat else "prompt"
            if message.startswith(("stop_token_ids", "logit_bias")):
                param = message.split(":")[0]
            raise bad(message, param,
                      "context_length_exceeded" if "does not fit the context" in message else "invalid_value") \
                from None
        except RuntimeError as e:
            self.live.clear()
            raise ApiError(503, str(e), code="engine_unavailable", type="server_error") from None

    def apply(self, update: Update) -> Choice | None:
        """Applies one update; returns its choice (None if the update is stale)."""
        choice = self.by_id.get(update.request_id)
        if choice is None or update.request_id not in self.live:
            return None
        if choice.feed(update):  # a stop string: the engine may stop generating it
            self.live.discard(update.request_id)
            self.worker.abort([update.request_id], reason="stop")
        if choice.finish_reason is not None:
            self.live.discard(update.request_id)
        return choice

    def cancel(self) -> None:
        """The client went away (or the handler failed): abort whatever still runs."""
        if self.live:
            self.worker.abort(self.live)
            self.live = set()

    def logprobs(self, choice: Choice, entries: list):
        """The response form of a choice's next logprob entries (None: not asked for)."""
        if self.prep.logprobs is None:
            return None
        if self.prep.chat:
            return chat_logprobs(self.tokenizer, entries)
        out, choice.logprob_offset = completion_logprobs(self.tokenizer, entries, choice.logprob_offset)
        return out

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prep.prompts)  # once per prompt, however many choices
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in self.choices[::self.prep.n])}}

    # -- chat messages: reasoning and tool calls read out of the text (serving/server/parsers.py) --
    def parser(self) -> Message | None:
        """A fresh parser for one chat choice's text (None: the text is the content)."""
        p, tools = self.prep, self.prep.tools
        if not p.chat or (not p.reasoning and (tools is None or tools.mode == "none")):
            return None
        return Message(p.reasoning, tools.mode if tools else None, tools.name if tools else None)

    def finish(self, choice: Choice) -> str | None:
        """vLLM's finish_reason: "tool_calls" when an auto or required choice called tools and stopped."""
        tools = self.prep.tools
        if choice.called and tools is not None and tools.mode in ("auto", "required") and choice.finish_reason == "stop":
            return "tool_calls"
        return choice.finish_reason

    def message(self, choice: Choice) -> dict:
        """A finished chat choice's message: content, and with the parsers its reasoning and tool calls."""
        parser = self.parser()
        if parser is None:
            return {"role": "assistant", "content": choice.text}
        d = parser.feed(choice.text, final=True)
        calls = tool_calls(d.calls)
        choice.called = bool(calls)
        out: dict = {"role": "assistant", "content": d.content or None}
        if self.prep.reasoning:
            out["reasoning_content"] = out["reasoning"] = d.reasoning
        if calls:
            out["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        return out

    def chat_delta(self, choice: Choice, text: str) -> dict:
        """The delta fields of a streamed chat chunk for the choice's next text (the last once it finished)."""
        if choice.parser is None:
            return {"content": text} if text else {}
        d = choice.parser.feed(text, final=choice.finish_reason is not None)
        out: dict = {}
        if d.reasoning:
            out["reasoning_content"] = out["reasoning"] = d.reasoning
        if d.content:
            out["content"] = d.content
        if d.calls:
            out["tool_calls"] = tool_calls(d.calls)
            choice.called = True
        return out


def tool_calls(pieces: list) -> list[dict]:
    """Parser call events (index, id, name, arguments) -> OpenAI's tool_calls entries, one per call: the
    first piece of a call carries its id, type and name (as vLLM streams them), later ones arguments."""
    entries: dict[int, dict] = {}
    for index, cid, name, arguments in pieces:
        entry = entries.get(index)
        if entry is None:
            entry = entries[index] = {"index": index, **({"id": cid, "type": "function"} if cid else {}),
                                      "function": {**({"name": name} if cid else {}), "arguments": ""}}
        entry["function"]["arguments"] += arguments
    return list(entries.values())
