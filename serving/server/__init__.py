"""An OpenAI-compatible HTTP server over the engine (docs/SERVER.md).

    python -m serving.server --model DIR [--deployment F] [--host 127.0.0.1 --port 8000] [--api-key KEY]

POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events),
GET /v1/models, POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus).

Modules: worker (the one thread that owns the engine), protocol (a request body -> validated
sampling parameters and token ids, run off the event loop), chat (messages, the chat template,
tools and tool_choice), constraints (the fields that ask for structured outputs), parsers
(reasoning and tool calls read out of a chat choice's text), output (choices: text, stops,
logprobs, messages), tokenize (/tokenize, /detokenize), app (routes, streaming, the edge: request
ids, API keys, body limit, errors), cli (the command line, the compilation cache, warm-up). Token
ids become text through serving/detokenizer.py, shared with `LLM.stream`.
"""

from serving.server.app import DEFAULT_MAX_BODY_BYTES, Server, create_app
from serving.server.errors import ApiError
from serving.server.protocol import Options
from serving.server.worker import EngineWorker, Update


def warm_up(engine) -> int:
    """Compiles every shape bucket of the engine step now (Engine.warmup), so no request waits for
    a compilation; returns the number of compilations."""
    return engine.warmup()


__all__ = ["DEFAULT_MAX_BODY_BYTES", "ApiError", "EngineWorker", "Options", "Server", "Update", "create_app",
           "warm_up"]
