"""SamplingParams and the on-device sampler.

Per row of a step: the grammar's token mask (structured outputs and min_tokens, serving/structured.py),
then logit_bias and presence / frequency / repetition penalties (vLLM's formulas and order; their
per-request state is the device's PenaltyTable, serving/penalties.py), then greedy or temperature +
min-p + top-k + top-p with a per-request seed; and the raw logprobs (log_softmax of the model's
logits after the grammar's mask, as vLLM's default `raw_logprobs`) of the sampled token and the top
MAX_LOGPROBS tokens, computed in the same jitted step. Every per-row input is one SamplingArrays
pytree of fixed shapes, so constrained and free requests share one compiled step.

Axis legend: B batch rows, S window positions (1 + MTP drafts), V vocabulary, W = ceil(V / 32)
mask words, K = MAX_LOGPROBS.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from serving.penalties import PROMPT_BIT, PenaltyTable
from serving.structured import StructuredOutputs

MAX_LOGPROBS = 20  # top logprobs a request may ask for (OpenAI's chat limit; vLLM's default max_logprobs)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # None: derived from the request id
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k (k <= MAX_LOGPROBS)
    presence_penalty: float = 0.0  # subtracted once from every token the output already holds
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt or output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); a dict is accepted
    include_stop_str_in_output: bool = False  # keep the text of the stop token that ended the output
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until the output holds this many tokens
    skip_special_tokens: bool = True  # leave special tokens' text out of the output text
    structured_outputs: StructuredOutputs | None = None  # a grammar the output follows (a dict is accepted)

    def __post_init__(self):
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        try:
            bias = tuple(sorted((int(t), float(b)) for t, b in bias))
        except (TypeError, ValueError):
            bias = None
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2 ** 31:
            problems.append(f"top_k must be an integer in [0, 2^31), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32):
            problems.append(f"seed must be an integer in [0, 2^32), got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            problems.append(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
                problems.append(f"{name} must be in [-2, 2], got {v!r}")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not 0 < rp <= 100:
            problems.append(f"repetition_penalty must be in (0, 100], got {rp!r}")
        if bias is None or any(not -100 <= b <= 100 for _, b in bias):
            problems.append(f"logit_bias must map token ids to biases in [-100, 100], got {self.logit_bias!r}")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0 or \
                (isinstance(self.max_tokens, int) and self.min_tokens > self.max_tokens):
            problems.append(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        structured = self.structured_outputs
        if isinstance(structured, dict):
            try:
                structured = StructuredOutputs(**structured)
            except (TypeError, ValueError) as e:
                problems.append(f"structured_outputs: {e}")
        elif structured is not None and not isinstance(structured, StructuredOutputs):
            problems.append(f"structured_outputs must be a StructuredOutputs or a dict, got {structured!r}")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "structured_outputs", structured)
        # a grammar or min_tokens: the request's rows take a token mask (serving/structured.py)
        object.__setattr__(self, "needs_mask", structured is not None or self.min_tokens > 0)
        # penalties or logit_bias: the request takes a PenaltyTable row (an attribute: read every step)
        object.__setattr__(self, "needs_table", bool(self.presence_penalty or self.frequency_penalty
                                                     or self.repetition_penalty != 1 or bias))
        # this request's row of SamplingArrays, built once (packing a batch then costs one np.array)
        # (top_k past 2^24 keeps every token of any vocabulary, and stays exact in float32)
        object.__setattr__(self, "_row", np.array([self.temperature, min(self.top_k, 1 << 24), self.top_p,
                                                   self.presence_penalty, self.frequency_penalty,
                                                   self.repetition_penalty, self.logprobs is not None, self.min_p],
                                                  np.float32))

    @classmethod
    def from_dict(cls, raw: dict) -> "SamplingParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown} (known: {sorted(known)})")
        return cls(**raw)


    def check_vocabulary(self, vocab_size: int) -> None:
        """Token ids the request names must exist (ValueError naming the first that does not)."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", [t for t, _ in self.logit_bias])):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """Everything `sample` needs per row, as one pytree (host numpy arrays until the step runs, but
    the mask: a device array, a constant for batches without a constrained row)."""
    temperature: jax.Array  # f32[B]
    top_k: jax.Array  # i32[B]
    top_p: jax.Array  # f32[B]
    seed: jax.Array  # u32[B]
    counter: jax.Array  # i32[B]: the position sampled, so draws do not depend on batch neighbours
    presence: jax.Array  # f32[B]
    frequency: jax.Array  # f32[B]
    repetition: jax.Array  # f32[B]
    slot: jax.Array  # i32[B]: the row's PenaltyTable slot on its rank (S: none, nothing read or counted)
    logprobs: jax.Array  # bool[B]: return logprob data
    min_p: jax.Array  # f32[B]
    guided: jax.Array  # bool[B]: the row's mask holds a constraint (no row: the mask is not read)
    mask: jax.Array | None = None  # i32[B, S, W]: bit v % 32 of word v // 32 set = token v allowed


def sampling_arrays(params: list[SamplingParams | None], seeds: list[int], counters: list[int],
                    slots: list[int], no_slot: int, mask=None, guided=None) -> SamplingArrays:
    """Host arrays for `sample`; None rows (padding) sample greedily and are discarded. mask, guided:
    the rows' token masks and which rows they constrain (serving/structured.py; None: no mask)."""
    rows = np.concatenate([p._row if p else _PADDING_ROW for p in params]).reshape(-1, 8)  # [B, 8]
    return SamplingArrays(rows[:, 0], rows[:, 1].astype(np.int32), rows[:, 2], np.array(seeds, np.uint32),
                          np.array(counters, np.int32), rows[:, 3], rows[:, 4], rows[:, 5],
                          np.array([no_slot if s is None else s for s in slots], np.int32), rows[:, 6] > 0,
                          rows[:, 7], np.zeros(len(params), bool) if guided is None else guided, mask)


_PADDING_ROW = np.array([0, 0, 1, 0, 0, 1, 0, 0], np.float32)  # greedy, no penalties, no logprobs


def apply_mask(logits, mask):
    """logits f32[B, S, V], mask i32[B, S, W] -> logits with the tokens the mask leaves out at -inf."""
    V = logits.shape[-1]
    v = jnp.arange(V)
    allowed = (jnp.take(mask, v // 32, axis=-1) >> (v % 32)) & 1  # [B, S, V]
    return jnp.where(allowed != 0, logits, -jnp.inf)


def penalize(logits, counts, bias, arrays: SamplingArrays):
    """logits f32[B, V]; counts i32[B, V] (output counts | PROMPT_BIT); bias f32[B, V]. vLLM's order:
    logit_bias, then repetition (prompt or output tokens), frequency and presence (output tokens)."""
    logits = logits + bias
    out = counts & (PROMPT_BIT - 1)
    seen = (counts != 0)  # in the prompt or the output
    rep = arrays.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - arrays.frequency[:, None] * out - arrays.presence[:, None] * (out > 0)


PARTIAL_TOP_K = 64  # top-k up to this runs on lax.top_k's k largest, not a sort of the vocabulary


def masked_logits(logits, arrays: SamplingArrays, sampled=None):
    """logits f32[B, V] -> the temperature-scaled logits with what min-p, top-k and top-p cut set to -inf
    (vLLM's order: temperature, min-p, then top-k and top-p). sampled bool[B]: the rows whose result
    is used (default all); the cut costs what they ask: nothing without top-k or top-p, the
    PARTIAL_TOP_K largest (lax.top_k) when each asks a top-k within them, a sort of the vocabulary
    otherwise."""
    V = logits.shape[-1]
    temperature, top_k, top_p = arrays.temperature, arrays.top_k, arrays.top_p
    sampled = jnp.ones(logits.shape[:1], bool) if sampled is None else sampled
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    # p / p_max >= min_p, in log space (min_p 0: log 0 = -inf keeps every token)
    scaled = jnp.where(scaled >= jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(arrays.min_p)[:, None],
                       scaled, -jnp.inf)
    has_k = (top_k > 0) & (top_k < V)
    wants = has_k | (top_p < 1)  # [B]: the row cuts (the others keep every token in any branch)
    cap = min(PARTIAL_TOP_K, V)

    def cut(desc):  # desc [B, n]: each row's n largest, descending (n = V: all)
        k = jnp.where(has_k, jnp.minimum(top_k, desc.shape[-1]), desc.shape[-1])
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=1)
        desc = jnp.where(desc >= kth, desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays; top_p 1 keeps
        # all: a cumulative sum rounding to 1 before the tail must not cut it)
        keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p >= 1)[:, None]
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(~wants[:, None] | (scaled >= jnp.maximum(threshold, kth)), scaled, -jnp.inf)

    branches = [lambda: scaled,  # no row cuts
                lambda: cut(jax.lax.top_k(scaled, cap)[0]),  # every row a top-k within the cap
                lambda: cut(-jnp.sort(-scaled, axis=-1))]  # the whole vocabulary sorted
    cuts = sampled & wants
    partial = jnp.all(~cuts | (has_k & (top_k <= cap)))
    return jax.lax.switch(jnp.where(jnp.any(cuts), jnp.where(partial, 1, 2), 0), branches)


def row_keys(arrays: SamplingArrays):
    """Each row's key: its seed folded with the sequence index it samples (independent of neighbours)."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(arrays.seed, arrays.counter)


def logprob_data(logits, tokens, want):
    """Raw logprobs: the sampled token's and the top K (ids, values), packed as int32[B, 2 + 2K]
    (floats bitcast) so the step's output stays one array. Computed only if a row asks."""
    B, K = logits.shape[0], min(MAX_LOGPROBS, logits.shape[-1])

    def compute(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_ids = jax.lax.top_k(logp, K)
        own = jnp.take_along_axis(logp, tokens[:, None], axis=1)
        return jnp.concatenate([jax.lax.bitcast_convert_type(own, jnp.int32), top_ids.astype(jnp.int32),
                                jax.lax.bitcast_convert_type(top_lp, jnp.int32)], axis=1)
    data = jax.lax.cond(jnp.any(want), compute, lambda _: jnp.zeros((B, 1 + 2 * K), jnp.int32), logits)
    return jnp.concatenate([tokens[:, None], data], axis=1)


def sample(logits, arrays: SamplingArrays, table: "PenaltyTable.Device"):
    """logits f32[B, V] -> (int32[B, 2 + 2K]: each row's token then its logprob data, the tokens)."""
    tokens, _, data = verify(logits[:, None], jnp.zeros((logits.shape[0], 0), jnp.int32),
                             jnp.zeros(logits.shape[0], jnp.int32), arrays, table)
    return data[:, 0], tokens[:, 0]


def accept_probability(p_draft):
    """Speculative sampling accepts a draft with probability min(1, p/q); the MTP drafts are the draft
    module's argmax (q one-hot, as vLLM runs MTP), so that is p(draft). (A test swaps in a biased rule.)"""
    return p_draft


def verify(logits, drafts, n_drafts, arrays: SamplingArrays, table: "PenaltyTable.Device",
           acceptance=accept_probability):
    """Samples a step's tokens, checking each row's drafts: speculative sampling, one implementation for
    plain and speculative steps (no drafts: S = 1, n_drafts = 0).

    logits f32[B, S, V]: the target's logits at the S = k + 1 positions of each row's window (its last
    token, then its drafts); drafts int32[B, k]: the drafted tokens (drafts[:, j] follows window
    position j); n_drafts int32[B]: how many of them the row has (0: a plain sample at position 0).
    Draft j+1 is accepted with probability acceptance(p_j(draft)), p_j the processed target distribution
    (the grammar's mask at position j, penalties seeing the output plus the drafts before j,
    temperature, min-p, top-k, top-p: a draft the grammar refuses has p_j = 0 and is rejected); at the first
    rejection the token is drawn from the residual max(0, p - q) normalised, i.e. p without the draft;
    if all are accepted, a bonus token is drawn from p at the last position. Greedy rows (p one-hot at the
    argmax) thus accept the longest agreeing prefix and then the target's token, exactly as decoding
    without drafts. Keys are the row's seed folded with the sequence index sampled (`row_keys`).

    -> tokens int32[B, S] (the accepted drafts, then the row's new token; later entries are junk),
       accepted int32[B], logprob data int32[B, S, 2 + 2K] (token first, as `logprob_data`)."""
    B, S, V = logits.shape
    j = jnp.arange(S)
    if arrays.mask is not None:  # most steps constrain no row: they skip unpacking the [B, S, W] mask
        logits = jax.lax.cond(jnp.any(arrays.guided), apply_mask, lambda x, _: x, logits, arrays.mask)
        arrays = dataclasses.replace(arrays, mask=None)
    per_pos = jax.tree.map(lambda a: jnp.repeat(a, S, axis=0), arrays)  # one row per (row, position)
    per_pos.counter = (arrays.counter - n_drafts)[:, None] + j  # the sequence index each position samples
    per_pos.counter = per_pos.counter.reshape(-1)
    flat = logits.reshape(B * S, V)

    def penalized(x):
        counts, bias = table.rows(arrays.slot)  # [B, V]: the output so far
        before = jnp.cumsum(jax.nn.one_hot(drafts, V, dtype=jnp.int32), axis=1)  # [B, k, V]: drafts before
        counts = counts[:, None] + jnp.concatenate([jnp.zeros((B, 1, V), jnp.int32), before], axis=1)
        return penalize(x, counts.reshape(B * S, V), jnp.repeat(bias, S, axis=0), per_pos)
    # most steps have no row with penalties or a bias: they skip reading [B, V] rows of the table
    processed = jax.lax.cond(jnp.any(arrays.slot < table.slots), penalized, lambda x: x, flat)
    target = jnp.concatenate([drafts, jnp.zeros((B, 1), jnp.int32)], axis=1).reshape(-1)  # draft after each position
    checks = (j[None] < n_drafts[:, None]).reshape(-1)  # a draft follows this position
    greedy = (arrays.temperature <= 0)[:, None]
    best = jnp.argmax(processed, axis=-1)

    def sampled(processed):  # sampled rows: accept with the rule's probability, else draw from p without the draft
        masked = masked_logits(processed, per_pos, jnp.repeat(~greedy[:, 0], S))  # [B * S, V]
        keys = row_keys(per_pos)
        p_draft = jnp.take_along_axis(jax.nn.softmax(masked, axis=-1), target[:, None], axis=1)[:, 0]
        u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1)))(keys)
        residual = jnp.where(checks[:, None] & (jnp.arange(V)[None] == target[:, None]), -jnp.inf, masked)
        return acceptance(p_draft) > u, jax.vmap(jax.random.categorical)(keys, residual)

    def all_greedy(processed):  # greedy rows need the argmax alone: no cut, softmax or draw
        return jnp.zeros(B * S, bool), best
    accept, drawn = jax.lax.cond(jnp.all(greedy), all_greedy, sampled, processed)
    ok = jnp.where(greedy, (best == target).reshape(B, S), accept.reshape(B, S))
    token = jnp.where(greedy, best.reshape(B, S), drawn.reshape(B, S)).astype(jnp.int32)
    accepted = jnp.sum(jnp.cumprod(ok & checks.reshape(B, S), axis=1), axis=1).astype(jnp.int32)
    tokens = jnp.where(j[None] < accepted[:, None], target.reshape(B, S), token)
    data = logprob_data(flat, tokens.reshape(-1), per_pos.logprobs)
    return tokens, accepted, data.reshape(B, S, -1)


def row_width(vocab: int, drafts: int = 0) -> int:
    """int32 values per row in the step's read-back: tokens accepted, the k next drafts, then per window
    position (k + 1) the token, its logprob, K top ids and logprobs."""
    return 1 + drafts + (drafts + 1) * (2 + 2 * min(MAX_LOGPROBS, vocab))


def unpack(host: np.ndarray, vocab: int, drafts: int = 0) -> tuple:
    """The step's read-back (int32[B * row_width]) -> tokens [B, S], accepted [B], next drafts [B, k],
    logprob [B, S], top ids [B, S, K], top logprobs [B, S, K] (S = k + 1)."""
    K, S = min(MAX_LOGPROBS, vocab), drafts + 1
    rows = host.reshape(-1, row_width(vocab, drafts))
    data = rows[:, 1 + drafts:].reshape(len(rows), S, 2 + 2 * K)
    return (data[..., 0], rows[:, 0], rows[:, 1:1 + drafts], data[..., 1].view(np.float32), data[..., 2:2 + K],
            data[..., 2 + K:].view(np.float32))


def row_logprobs(params: SamplingParams, token: int, lp, top_ids, top_lps) -> tuple:
    """One sampled token's logprob entry: (logprob, [(id, logprob)] of the top params.logprobs)."""
    k = params.logprobs
    return float(lp), [(int(t), float(v)) for t, v in zip(top_ids[:k], top_lps[:k])]
