"""POST /tokenize and /detokenize, in vLLM's request and response shapes: a prompt (or chat messages,
rendered as /v1/chat/completions renders them) -> {count, max_model_len, tokens, token_strs}; token
ids -> {prompt}. Run in the parser threads, like every request body."""

from __future__ import annotations

from serving.server import chat as chatting
from serving.server.errors import ApiError, bad
from serving.server.output import token_text
from serving.server.protocol import Protocol, _flag, parse_json

FIELDS = {"model", "prompt", "messages", "add_special_tokens", "return_token_strs", "add_generation_prompt",
          "continue_final_message", "chat_template_kwargs", "tools", "chat_template"}


class Tokenization:
    def __init__(self, protocol: Protocol):
        self.p = protocol

    def _body(self, raw: bytes, fields: set[str]) -> dict:
        body = parse_json(raw)
        if body.get("model") is not None and body["model"] not in self.p.accepted:
            raise ApiError(404, f"The model '{body['model']}' does not exist", "model", "model_not_found")
        unknown = sorted(set(body) - fields)
        if unknown:
            raise bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0], "unknown_parameter")
        if self.p.tokenizer is None:
            raise bad("this model has no tokenizer.json", None, "unsupported")
        return body

    def tokenize(self, raw: bytes) -> dict:
        body = self._body(raw, FIELDS)
        tok = self.p.tokenizer
        if body.get("messages") is not None:
            template = chatting.template_options(body)
            tools = chatting.check_tools(body.get("tools"))
            text = chatting.render(tok, chatting.check_messages(body["messages"]), tools, template,
                                   self.p.options.chat_template)
            ids = tok.tok.encode(text, add_special_tokens=False).ids
            if _flag(body, "add_special_tokens") and self.p.bos is not None:
                ids = [self.p.bos] + ids
        elif isinstance(body.get("prompt"), str):  # (counted whatever its length: the body limit bounds it)
            bos = [self.p.bos] if _flag(body, "add_special_tokens", True) and self.p.bos is not None else []
            ids = bos + tok.encode(body["prompt"])
        else:
            raise bad("give a 'prompt' string or chat 'messages'", "prompt", "missing_required_parameter")
        strs = [token_text(tok, t) for t in ids] if _flag(body, "return_token_strs") else None
        return {"count": len(ids), "max_model_len": self.p.context_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, raw: bytes) -> dict:
        body = self._body(raw, {"model", "tokens"})
        ids = body.get("tokens")
        if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise bad("tokens must be a list of token ids", "tokens",
                      "missing_required_parameter" if ids is None else "invalid_value")
        bad_id = next((t for t in ids if not 0 <= t < self.p.vocab_size), None)
        if bad_id is not None:
            raise bad(f"token id {bad_id} is outside the vocabulary [0, {self.p.vocab_size})", "tokens")
        return {"prompt": self.p.tokenizer.decode(ids)}
