"""Trains jaxseek-tiny: a small model of DeepSeek-V3's exact architecture, on checkable digit tasks.

The model is our own DeepseekV3 (MLA with YaRN, a dense layer then sigmoid-gated MoE layers with
grouped routing and a shared expert, one MTP module), trained with AdamW (warmup + cosine) on
instructions whose answers can be checked exactly ("reverse 12345=" -> "54321", "sort 3141=" ->
"1134", "add 57+68=" -> "125"), in plain-completion and chat form. The routing bias is not
trained by gradient: it follows DeepSeek-V3's auxiliary-loss-free rule after every step.

The checkpoint is written in DeepSeek's release format (FP8 e4m3 + weight_scale_inv, 128x128
blocks) with a character-level tokenizer.json and a DeepSeek-style chat template, then reloaded
and scored by greedy decoding (prefill + absorbed decode) on fresh problems.

    python scripts/train_tiny.py [--out models/jaxseek-tiny] [--steps N] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402

from model import DeepseekV3, ModelConfig  # noqa: E402
from model.checkpoint import save_safetensors  # noqa: E402
from model.transformer import param_count  # noqa: E402

BOS, EOS, USER, ASSISTANT, PAD, UNK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                       "<｜Assistant｜>", "<｜▁pad▁｜>", "<｜unk｜>")
SPECIALS = [BOS, EOS, USER, ASSISTANT, PAD, UNK]  # ids 0.. in this order: bos 0, eos 1 as DeepSeek
CHARS = [chr(c) for c in range(32, 127)]  # printable ASCII, one token each
# task: (operands have 1..max digits, share of training sequences). Addition gets 1-2 digit operands
# and the largest share: the sum is written most-significant digit first, so the first digit already
# depends on every carry, far harder to learn than reverse or sort. With 3-4 digit operands it was
# still only 30-40% exact after the whole CPU budget (docs/TINY_MODEL.md).
TASK_SPEC = {"reverse": (8, 0.35), "sort": (8, 0.25), "add": (2, 0.4)}
TASKS = tuple(TASK_SPEC)
# DeepSeek-V3's template (without its tool-call branches): a system prompt follows bos directly.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


# ---- tokenizer -------------------------------------------------------------------------------------

def build_tokenizer() -> Tokenizer:
    """One token per character; encode() prepends bos, as DeepSeek-V3's tokenizer does."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, 0)])
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "model_max_length": 256, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }


# ---- the task --------------------------------------------------------------------------------------

def length(task: str, rng: np.random.Generator) -> int:
    return int(rng.integers(1, TASK_SPEC[task][0] + 1))


def problem(task: str, rng: np.random.Generator) -> tuple[str, str]:
    """-> (instruction, answer), e.g. ("sort 3141", "1134"). Digit strings may start with 0; numbers do not."""
    if task in ("reverse", "sort"):
        s = "".join(map(str, rng.integers(0, 10, length(task, rng))))
        return f"{task} {s}", s[::-1] if task == "reverse" else "".join(sorted(s))
    a, b = (int(rng.integers(10 ** (n - 1) if n > 1 else 0, 10 ** n)) for n in (length(task, rng), length(task, rng)))
    return f"add {a}+{b}", str(a + b)


def prompt_text(instruction: str, chat: bool) -> str:
    """The text before the answer (bos is added by the tokenizer)."""
    return f"{USER}{instruction}{ASSISTANT}" if chat else f"{instruction}="


def longest_sequence() -> int:
    """Tokens in the longest training sequence: bos, the chat form of a task's largest problem, eos."""
    def largest(task):
        n = "9" * TASK_SPEC[task][0]
        return (f"add {n}+{n}", str(2 * int(n))) if task == "add" else (f"{task} {n}", n)
    return max(1 + len(q) + 2 + len(a) + 1 for q, a in map(largest, TASKS))


SEQ_LEN = longest_sequence()  # every batch is padded to it, so the step compiles once
MAX_ANSWER = max(TASK_SPEC[t][0] for t in TASKS) + 1  # tokens a greedy answer may take before eos


def encode_batch(tok: Tokenizer, rng: np.random.Generator, batch: int):
    """A training batch: half plain, half chat, tasks drawn by their share. -> tokens, positions (-1 on
    padding) and the loss weight of each token as a target (answer + eos), all [B, SEQ_LEN]; task [B]."""
    tasks = rng.choice(len(TASKS), batch, p=[TASK_SPEC[t][1] for t in TASKS])
    chat = rng.random(batch) < 0.5
    pairs = [problem(TASKS[t], rng) for t in tasks]
    prompts = tok.encode_batch([prompt_text(q, c) for (q, _), c in zip(pairs, chat)])
    answers = tok.encode_batch([a + EOS for _, a in pairs], add_special_tokens=False)
    tokens = np.full((batch, SEQ_LEN), SPECIALS.index(PAD), np.int32)
    weight = np.zeros((batch, SEQ_LEN), np.float32)
    lengths = np.zeros(batch, np.int32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        n, m = len(p.ids), len(a.ids)
        tokens[i, :n + m] = p.ids + a.ids
        weight[i, n:n + m] = 1.0
        lengths[i] = n + m
    positions = np.where(np.arange(SEQ_LEN)[None] < lengths[:, None], np.arange(SEQ_LEN)[None], -1)
    return {"tokens": tokens, "positions": positions.astype(np.int32), "weight": weight, "task": tasks.astype(np.int32)}


# ---- the model -------------------------------------------------------------------------------------

def hf_config(vocab_size: int) -> dict:
    """DeepSeek-V3's config.json with every size shrunk; every architectural feature kept."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
        "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "moe_layer_freq": 1, "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
        "v_head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 256, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": SPECIALS.index(BOS), "eos_token_id": SPECIALS.index(EOS),
    }


BIAS = nnx.PathContains("e_score_correction_bias")
# The MTP module's embedding and output head: DeepSeek-V3 shares them with the main model (its
# checkpoint stores copies), so in training they are views of the main weights, not parameters.
MTP_SHARED = nnx.All(nnx.PathContains("mtp"), nnx.Any(nnx.PathContains("embed_tokens"), nnx.PathContains("head")))
def masked_ce(logits, targets, weight):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def shifted(x, k: int, fill=0):
    """x[:, i] <- x[:, i + k] (the target k tokens ahead), padded at the end."""
    return jnp.concatenate([x[:, k:], jnp.full_like(x[:, :k], fill)], axis=1)


def shared_with_mtp(params, template):
    """The MTP module's copies of the main embedding and output head (a state shaped as template)."""
    shared = jax.tree.map(lambda x: x, template)  # fresh variables, writable in this trace
    nnx.replace_by_pure_dict(shared, {"mtp": {
        "embed_tokens": {"weight": params["embed_tokens"]["weight"][...][None]},
        "shared_head": {"head": {"weight": params["lm_head"]["weight"][...][None]}}}})
    return shared


def losses(params, bias, shared, rest, graphdef, batch):
    """-> (main + lambda * MTP loss, metrics): next-token loss on answers, and MTP's next-next-token loss."""
    net = nnx.merge(graphdef, bias, shared_with_mtp(params, shared), params, rest)
    tokens, positions, weight = batch["tokens"], batch["positions"], batch["weight"]
    B, S = tokens.shape
    hidden, _, stats = net.forward_step(tokens, positions, net._zero_cache(B, S), absorbed=False)
    logits = net.logits(hidden)
    targets, w1 = shifted(tokens, 1), shifted(weight, 1)
    main = masked_ce(logits, targets, w1)
    mtp_logits, mtp_stats = net.mtp_logits(hidden, tokens, positions)
    mtp = masked_ce(mtp_logits, shifted(tokens, 2), shifted(weight, 2))
    right = (logits.argmax(-1) == targets) | (w1 == 0)
    load = jnp.concatenate([stats["expert_load"], mtp_stats["expert_load"][None]]).astype(jnp.float32)
    exact = right.all(-1)
    # Teacher-forced exact match equals greedy exact match: every answer token is the argmax.
    per_task = {f"exact_{t}": (exact * (batch["task"] == i)).sum() / jnp.maximum((batch["task"] == i).sum(), 1)
                for i, t in enumerate(TASKS)}
    metrics = {"loss": main, "mtp_loss": mtp, "exact": exact.mean(), **per_task, "load": load}
    return main + batch["mtp_lambda"] * mtp, metrics


def balance(bias_state, load, gamma):
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower
    over-loaded ones, by a fixed step. load [L_moe + 1, E]: the MoE layers', then the MTP layer's."""
    step = gamma * jnp.sign(load.mean(-1, keepdims=True) - load)
    pure = nnx.to_pure_dict(bias_state)
    n_moe = pure["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"].shape[0]
    pure["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"] += step[:n_moe]
    pure["mtp"]["mlp"]["gate"]["e_score_correction_bias"] += step[n_moe:]
    nnx.replace_by_pure_dict(bias_state, pure)
    return bias_state


def make_step(graphdef, optimizer, gamma: float):
    @jax.jit
    def step(params, opt_state, bias, shared, rest, batch):
        grads, metrics = jax.grad(losses, has_aux=True)(params, bias, shared, rest, graphdef, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, balance(bias, metrics["load"], gamma), metrics
    return step


# ---- training --------------------------------------------------------------------------------------

class Progress:
    """One self-overwriting status line on stderr."""

    def __init__(self, total: int):
        self.total, self.start = total, time.perf_counter()

    def update(self, step: int, m: dict):
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step)
        width = 30
        bar = "#" * (width * step // self.total)
        exact = " ".join(f"{t} {m['exact_' + t]:.2f}" for t in TASKS)
        sys.stderr.write(f"\r[{bar:<{width}}] {step}/{self.total} loss {m['loss']:.4f} mtp {m['mtp_loss']:.4f} "
                         f"exact {exact} | {elapsed:4.0f}s, ETA {eta:4.0f}s ")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def log_entry(step: int, sums: dict, n: int, lr: float) -> dict:
    """Means over the steps since the last entry; the load balance is routed tokens of the busiest
    expert over the mean, worst layer (1.0: perfectly balanced)."""
    balance = np.asarray(sums["load"]).max(-1) / np.asarray(sums["load"]).mean(-1)
    entry = {"step": step, "lr": lr, "max_over_mean_load": float(balance.max()),
             "max_over_mean_load_per_layer": [round(float(b), 3) for b in balance]}
    entry.update({k: float(v) / n for k, v in sums.items() if k != "load"})
    return entry


def train(args, tok: Tokenizer):
    cfg = ModelConfig.from_dict(hf_config(tok.get_vocab_size()))
    # (a model no deployment configured runs XLA's GEMMs, which have gradients, in the tiled layout of
    # model/experts.py on one device: XLA:CPU computes lax.ragged_dot densely, 10x slower here)
    net = DeepseekV3(cfg, jnp.float32, nnx.Rngs(args.seed))
    graphdef, bias, shared, params, rest = nnx.split(net, BIAS, MTP_SHARED, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, args.lr * 0.02)
    adamw = optax.adamw(schedule, b2=0.98, weight_decay=args.weight_decay)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), adamw)
    opt_state = optimizer.init(params)
    step = make_step(graphdef, optimizer, args.bias_gamma)
    rng = np.random.default_rng(args.seed)
    progress, log, sums, since = Progress(args.steps), [], None, 0
    for i in range(1, args.steps + 1):
        batch = {**encode_batch(tok, rng, args.batch), "mtp_lambda": np.float32(args.mtp_lambda)}
        params, opt_state, bias, metrics = step(params, opt_state, bias, shared, rest, batch)
        # Summed on device; the host syncs only at log steps.
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        since += 1
        if i % args.log_every == 0 or i == args.steps:
            log.append(log_entry(i, sums, since, float(schedule(i))))
            progress.update(i, log[-1])
            sums, since = None, 0
    progress.close()
    nnx.update(net, bias, shared_with_mtp(params, shared), params)
    net.refresh_derived()  # the absorbed decode's halves of the trained kv_b_proj
    return net, log


# ---- evaluation: greedy decoding through the serving path ------------------------------------------

def greedy(net: DeepseekV3, tok: Tokenizer, prompts: list[str], max_new: int,
           add_special_tokens: bool = True) -> list[str | None]:
    """Batched greedy completion: one prefill of the right-padded prompts, then absorbed decode steps.
    add_special_tokens=False: the prompts spell out their own special tokens (a released tokenizer)."""
    encoded = [tok.encode(p, add_special_tokens=add_special_tokens).ids for p in prompts]
    lengths = np.array([len(e) for e in encoded], np.int32)
    tokens = np.full((len(prompts), lengths.max()), SPECIALS.index(PAD), np.int32)
    for i, e in enumerate(encoded):
        tokens[i, :len(e)] = e
    cache = net.init_cache(len(prompts), int(lengths.max()) + max_new)
    logits, cache = net.prefill(tokens, lengths, cache)
    nxt = np.asarray(logits)[np.arange(len(prompts)), lengths - 1].argmax(-1)
    out = [nxt]
    for t in range(max_new - 1):
        logits, cache = net.decode(nxt, lengths + t, cache)
        nxt = np.asarray(logits).argmax(-1)
        out.append(nxt)
    eos = net.config.eos_token_ids[0]
    # A row that never emits eos has no answer (None), so it counts as wrong.
    return [tok.decode(row[:row.index(eos)]) if eos in row else None for row in np.stack(out, 1).tolist()]


def accuracy(net: DeepseekV3, tok: Tokenizer, seed: int, n: int) -> dict[str, float]:
    """Exact-match accuracy per task and form on n fresh problems each (seeded apart from training)."""
    rng = np.random.default_rng([seed, 1])
    result = {}
    for task in TASKS:
        pairs = [problem(task, rng) for _ in range(n)]
        for form, chat in (("plain", False), ("chat", True)):
            got = greedy(net, tok, [prompt_text(q, chat) for q, _ in pairs], MAX_ANSWER + 1)
            result[f"{task}/{form}"] = float(np.mean([g == a for g, (_, a) in zip(got, pairs)]))
    return result


# ---- output ----------------------------------------------------------------------------------------

def save(net: DeepseekV3, tok: Tokenizer, out: Path) -> None:
    save_safetensors(net, out, fp8=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")


def plot(log: list[dict], path: Path) -> None:
    """Losses, teacher-forced exact match per task, and expert load balance against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [m["step"] for m in log]
    fig, (loss, exact, load) = plt.subplots(1, 3, figsize=(15, 4))
    loss.plot(steps, [m["loss"] for m in log], label="next-token loss (answers)")
    loss.plot(steps, [m["mtp_loss"] for m in log], label="MTP loss (token i+2)")
    loss.set(yscale="log", ylabel="cross-entropy (nats)", title="training loss")
    for task in TASKS:
        exact.plot(steps, [m["exact_" + task] for m in log], label=task)
    exact.set(ylim=(0, 1.02), ylabel="fraction of answers", title="exact match (teacher-forced, training batches)")
    load.plot(steps, [m["max_over_mean_load"] for m in log], label="worst of the MoE layers and MTP")
    load.axhline(1.0, color="gray", lw=0.8)
    load.set(ylabel="busiest expert's tokens / mean", title="expert load (aux-loss-free bias)")
    for ax in (loss, exact, load):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("jaxseek-tiny training")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "models" / "jaxseek-tiny", help="checkpoint directory")
    p.add_argument("--steps", type=int, default=900, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the data and the evaluation")
    p.add_argument("--batch", type=int, default=128, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    p.add_argument("--mtp-lambda", type=float, default=0.3, help="weight of the MTP loss")
    p.add_argument("--bias-gamma", type=float, default=1e-3, help="routing-bias update speed")
    p.add_argument("--log-every", type=int, default=25, help="steps between log entries")
    p.add_argument("--eval-problems", type=int, default=200, help="fresh problems per task and form")
    p.add_argument("--json", action="store_true", help="print the summary (train_log.json less the log) as JSON")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tok = build_tokenizer()
    start = time.perf_counter()
    net, log = train(args, tok)
    train_s = time.perf_counter() - start
    save(net, tok, args.out)
    start = time.perf_counter()
    acc = accuracy(DeepseekV3.from_pretrained(args.out), tok, args.seed, args.eval_problems)
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": f"{jax.devices()[0].platform}, {os.cpu_count()} cores", "params": param_count(net),
        "checkpoint_mb": round(sum(f.stat().st_size for f in args.out.glob("*.safetensors")) / 1e6, 2),
        "train_wall_s": round(train_s, 1), "eval_wall_s": round(time.perf_counter() - start, 1),
        "final": log[-1], "accuracy_fp8_reload": acc, "log": log,
    }
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(log, args.out / "loss_curve.png")
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=1))
    else:
        print(f"trained {args.steps} steps in {train_s:.0f}s; exact-match accuracy after the FP8 reload "
              f"({args.eval_problems} fresh problems each):")
        for name, value in acc.items():
            print(f"  {name:14s} {value:.3f}")
    return summary


if __name__ == "__main__":
    main()
