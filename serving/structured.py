"""Structured outputs: a grammar (a JSON schema, any JSON object, a regex, a choice of strings, a
Lark or GBNF grammar) that a request's output follows, as vLLM's `structured_outputs` with its
llguidance backend; and min_tokens, which masks EOS and the stop tokens the same way.

llguidance (a Rust core) builds a matcher per request from the checkpoint's tokenizer.json and
computes token masks on the host as int32 bitmasks: bit v % 32 of word v // 32 set = token v
allowed. A step's masks are one int32 [rows, window, ceil(V / 32)] argument of the jitted step
(SamplingArrays.mask), all ones for unconstrained rows, so constrained and free requests share one
compiled step. With MTP, window position j's mask is the grammar's state after the row's drafts
1..j: a draft the grammar refuses is left out of the mask before it, so verification rejects it;
the matcher advances by what a step accepted only (`Guide.advance`), the drafts' trial advances
are rolled back at once (`Guide.fill`).

`Guide.fill` needs only the tokens a request has accepted and the drafts it will verify, so the
masks of step N + 1 can be computed from step N's tokens while the device is busy (an asynchronous
step loop: `fill_masks` apart from `pack`); today the runner computes them when it packs a batch.

With a reasoning parser the grammar starts after the reasoning ends (vLLM's behaviour): the guide
passes tokens through until the output holds `after` (the `</think>` token ids), then constrains.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading

import numpy as np

KINDS = ("json", "regex", "choice", "grammar", "json_object")
CACHE = 128  # compiled grammars kept (LRU): n choices and repeated schemas compile once


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of json (a JSON schema, as a dict or its text), regex, choice (strings), grammar
    (Lark or GBNF) or json_object (any JSON object); vLLM's field names. after: token ids the
    output must hold before the grammar applies (the end of the reasoning; empty: from the start)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between tokens
    after: tuple[int, ...] = ()

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}, got {given or 'none'}")
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json))  # hashable; key order kept (llguidance's order)
        for name in ("regex", "grammar", "json"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or \
                    any(not isinstance(c, str) for c in self.choice):
                raise ValueError(f"choice must be a non-empty list of strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object not in (None, True, False):
            raise ValueError(f"json_object must be a boolean, got {self.json_object!r}")
        object.__setattr__(self, "after", tuple(int(t) for t in self.after))

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def grammar_text(self) -> str:
        """The llguidance grammar (ValueError: a malformed schema, naming the problem)."""
        import llguidance
        ws = {"whitespace_flexible": not self.disable_any_whitespace}  # vLLM's default: any whitespace
        kind = self.kind
        if kind in ("json", "json_object"):
            schema = self.json if kind == "json" else '{"type": "object"}'
            try:
                if not isinstance(json.loads(schema), (dict, bool)):
                    raise ValueError("a JSON schema is an object (or true / false)")
            except json.JSONDecodeError as e:
                raise ValueError(f"the schema is not JSON ({e})") from None
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=ws)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return llguidance.grammar_from("grammar", self.grammar)  # Lark, or GBNF converted to Lark


class Grammars:
    """Compiles grammars against one tokenizer (built on first use) and keeps the last CACHE compiled;
    thread-safe (the server compiles in its parser threads, the engine thread takes copies)."""

    def __init__(self, tokenizer_file, vocab: int, eos: tuple[int, ...]):
        """tokenizer_file: the checkpoint's tokenizer.json (None: min_tokens only, no grammars)."""
        self.file, self.vocab, self.eos = tokenizer_file, vocab, tuple(eos)
        self.words = -(-vocab // 32)  # W: mask words per row
        self._tokenizer = None
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        if self.file is None:
            raise ValueError("structured outputs need the checkpoint's tokenizer.json")
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = ll_tokenizer(self.file, self.vocab, self.eos)
            return self._tokenizer

    def compile(self, spec: StructuredOutputs):
        """A fresh matcher at the grammar's start (ValueError naming what is wrong with the grammar)."""
        import llguidance
        key = dataclasses.replace(spec, after=())
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            tokenizer = self.tokenizer
            text = spec.grammar_text()
            template = llguidance.LLMatcher(tokenizer, text, log_level=0)  # (drops the GIL while it compiles)
            if template.is_error():  # (llguidance's message, without its echo of the grammar's source)
                lines = [ln for ln in template.get_error().splitlines() if ln.strip() and "|" not in ln[:8]
                         and ln.strip() != "^"]
                raise ValueError(f"{spec.kind}: {' '.join(' '.join(lines).split())[:600]}")
            mask = np.full((1, self.words), -1, np.int32)
            _fill(template, mask, 0)
            allowed = np.flatnonzero(_bits(mask[0], self.vocab))
            if not template.is_accepting() and all(tokenizer.is_special_token(int(t)) for t in allowed):
                raise ValueError(f"{spec.kind}: matches no text this model's vocabulary can spell")
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > CACHE:
                    self._cache.popitem(last=False)
        return template.deep_copy()

    def guide(self, params) -> "Guide":
        """The request's guide (its grammar compiled, or a copy from the cache)."""
        spec = params.structured_outputs
        stops = () if params.min_tokens == 0 else params.stop_token_ids + (() if params.ignore_eos else self.eos)
        matcher = self.compile(spec) if spec is not None else None
        return Guide(matcher, spec.after if spec is not None else (), params.min_tokens, stops, self.eos)


class Guide:
    """One request's constraint as it generates: its grammar's matcher (None: min_tokens only), the
    token ids after which the grammar applies, and min_tokens."""

    def __init__(self, matcher, after: tuple[int, ...], min_tokens: int, stops: tuple[int, ...],
                 eos: tuple[int, ...]):
        self.matcher, self.after, self.min_tokens = matcher, list(after), min_tokens
        self.open = not after  # the grammar applies (after the reasoning)
        self.tail: list[int] = []  # the last len(after) tokens, while closed
        self.produced = 0  # output tokens so far
        self.stops = _words_and_bits(stops)  # cleared while produced < min_tokens
        self.eos = _words_and_bits(eos)

    def advance(self, tokens) -> None:
        """The tokens a step accepted (its accepted drafts and its new token)."""
        for token in tokens:  # (a token the grammar refuses puts the matcher in its error state: EOS only)
            self._take(int(token), trial=False)

    def _consumes(self) -> bool:
        return self.matcher is not None and self.open and not self.matcher.is_stopped()

    def _take(self, token: int, trial: bool) -> bool:
        """Advances by one token; False if a trial token is refused by the grammar (nothing changed)."""
        if self._consumes():
            if trial and self.matcher.try_consume_tokens([token]) != 1:
                return False
            if not trial:
                self.matcher.consume_token(token)
        elif self.matcher is not None:
            self.tail = (self.tail + [token])[-len(self.after):]
            self.open = self.tail == self.after
        self.produced += 1
        return True

    def fill(self, out: np.ndarray, drafts: list[int]) -> None:
        """Masks for a window: out i32[S, W] (all ones on entry), position j after drafts[:j]. The trial
        advance over the drafts is rolled back; a draft the grammar refuses ends the masks there
        (verification rejects it, so later positions are never sampled)."""
        state = self.open, self.tail, self.produced
        consumed = 0
        for j in range(len(drafts) + 1):
            if self.matcher is not None and self.open:
                _fill(self.matcher, out, j)
            if self.produced < self.min_tokens:
                words = out[j].view(np.uint32)
                kept = words.copy()
                np.bitwise_and.at(words, self.stops[0], ~self.stops[1])
                if not words.any():  # the grammar allows only its end: the grammar wins over min_tokens
                    words[:] = kept
            if j == len(drafts):
                break
            consumes = self._consumes()
            if not self._take(drafts[j], trial=True):
                break
            consumed += consumes
        if consumed:
            self.matcher.rollback(consumed)
        self.open, self.tail, self.produced = state


def fill_masks(rows: list, batch: int, window: int, words: int):
    """rows: (batch row, guide, drafts) of the constrained rows -> (mask i32[B, S, W], guided bool[B]),
    or (None, None) when no row is constrained."""
    if not rows:
        return None, None
    mask = np.full((batch, window, words), -1, np.int32)
    guided = np.zeros(batch, bool)
    for b, guide, drafts in rows:
        guide.fill(mask[b], drafts)
        guided[b] = True
    return mask, guided


def _fill(matcher, mask: np.ndarray, index: int) -> None:
    import llguidance.numpy
    llguidance.numpy.fill_next_token_bitmask(matcher, mask, index)


def _bits(words: np.ndarray, vocab: int) -> np.ndarray:
    """i32[W] -> bool[vocab]."""
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def _words_and_bits(ids) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(sorted(set(ids)), np.int64)
    return ids // 32, (np.uint32(1) << (ids % 32).astype(np.uint32)).astype(np.uint32)


def ll_tokenizer(path, vocab: int, eos: tuple[int, ...]):
    """llguidance's tokenizer for the checkpoint's tokenizer.json. A tokenizer whose decoder llguidance
    does not read (the embedded model's character-level one) is given as each token's own text."""
    import llguidance
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(path))
    try:
        return llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=list(eos))
    except ValueError:
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTexts(tok, eos)), n_vocab=vocab,
                                      eos_token=list(eos))


class _TokenTexts:
    """What llguidance.TokenizerWrapper reads: each token's bytes, the special tokens, an encoder."""

    def __init__(self, tok, eos):
        added = tok.get_added_tokens_decoder()
        self.tok, self.eos_token_id, self.bos_token_id = tok, eos[0], None
        self.special_token_ids = [i for i, t in added.items() if t.special]
        self.tokens = [(added[i].content if i in added else tok.decode([i], skip_special_tokens=False)).encode()
                       for i in range(tok.get_vocab_size(with_added_tokens=True))]

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self.tok.encode(text, add_special_tokens=False).ids
