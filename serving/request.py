"""A request on the host: its record, the rows a step runs, what a step did to it, and the one
check every prompt passes before it is queued (the engine and the HTTP server both call
`validate_prompt`)."""

from __future__ import annotations

import dataclasses
import time

from serving.sampling import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int  # params.max_tokens, capped so the sequence fits the context
    rank: int = -1
    blocks: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # full prompt blocks
    cached: int = 0  # prompt tokens found in the prefix cache (device or disk)
    computed: int = 0  # tokens whose KV rows are in the cache (or being written by a dispatched step)
    pending: int = 0  # tokens sampled by dispatched steps, not yet read by the host (async scheduling)
    output: list[int] = dataclasses.field(default_factory=list)
    drafts: list[int] = dataclasses.field(default_factory=list)  # MTP's proposals for the next step to verify
    guide: object = None  # serving.structured.Guide: its grammar / min_tokens (None: unconstrained)
    finish_reason: str | None = None
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    admitted: int = -1  # the scheduler's admission order (preemption takes the latest on a rank)

    @property
    def prefill_end(self) -> int:
        """The tokens a prefill computes before decoding goes on: the prompt; after a preemption
        (recompute) every token but the last one sampled, whose KV row the next decode step writes."""
        return len(self.prompt) + max(0, len(self.output) - 1)

    def tokens(self, start: int, stop: int) -> list[int]:
        """The sequence's tokens [start, stop) (prompt then output; stop may run past its end), taken by
        position: a step's host work is the tokens it feeds, not the context (no prompt + output copy)."""
        P = len(self.prompt)
        head = self.prompt[start:min(stop, P)] if start < P else []
        return head + self.output[max(start - P, 0):max(stop - P, 0)]

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prefill_end


@dataclasses.dataclass
class Batch:
    kind: str  # "prefill" | "decode" (a mixed step runs one of each: serving/engine.py)
    rows: list[list[tuple[Request, int, int]]]  # per rank: (request, first position, token count)
    slots: list[list[int]] = dataclasses.field(default_factory=list)  # per rank: each row's place in the batch


@dataclasses.dataclass
class Event:
    """What one step did to one request: new tokens, and the finish reason once it is done."""
    request: Request
    new_tokens: list[int]
    finished: bool
    logprobs: list | None = None  # per new token: (logprob, [(id, logprob)] top) if the request asked


def validate_prompt(prompt_ids: list[int], vocab: int, context_len: int, request_id: str) -> None:
    """Raises ValueError, one sentence naming the request, for a prompt no step could serve."""
    if not prompt_ids:
        raise ValueError(f"request {request_id}: empty prompt")
    if len(prompt_ids) >= context_len:
        raise ValueError(f"request {request_id}: prompt of {len(prompt_ids)} tokens does not fit the context of "
                         f"{context_len} (serving.max_model_len) with room to generate")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"request {request_id}: token id {bad} is outside the vocabulary [0, {vocab})")


def finish_reason(req: Request, token: int, eos_token_ids) -> str | None:
    p = req.params
    if token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids):
        return "stop"
    if len(req.output) >= req.max_tokens:
        return "length"
    return None
