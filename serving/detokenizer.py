"""Token ids -> text, incrementally: one implementation for `LLM.stream`, `LLM.generate` and the
HTTP server (serving/server/).

Decoding a whole output at every new token costs O(n^2) over a request; decoding only the new ids
loses the context some tokenizers need (a leading space, a byte-fallback character split over
tokens). So, as vLLM does, each step decodes a short window: the ids already read (`prefix` to
`read`) and the ids after them, and emits the difference. Text that ends in U+FFFD (half a UTF-8
character) is held back until the next token completes it, or the output ends.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer  # serving.api.Tokenizer (decode(ids) -> str) or None: no text
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, ids: list[int], final: bool = False) -> str:
        """Takes new token ids; returns the text they complete (all of what is left when final)."""
        self.ids.extend(ids)
        if self.tok is None:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""


def text_ids(new_ids: list[int], finish_reason: str | None, include_stop: bool) -> list[int]:
    """The ids whose text is shown: an engine "stop" ends on the stop token (EOS or one of
    stop_token_ids), whose text is dropped unless include_stop_str_in_output (vLLM's rule)."""
    if finish_reason == "stop" and new_ids and not include_stop:
        return new_ids[:-1]
    return new_ids
