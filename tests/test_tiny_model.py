"""The shipped models/jaxseek-tiny: DeepSeek-V3's architecture in DeepSeek's FP8 release format,
and trained: greedy decoding answers fresh digit problems exactly, in plain and chat form."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer

from model import DeepseekV3, ModelConfig
from model.checkpoint import SafetensorsDir
from model.experts import ExpertWeights, grouped_ffn

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "jaxseek-tiny"
sys.path.insert(0, str(ROOT / "scripts"))
from train_tiny import greedy  # noqa: E402  (the trainer's own evaluation decoder)
BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
DIGITS = {"reverse": 8, "sort": 8, "add": 2}  # the training range of each task (docs/TINY_MODEL.md)
N_PROBLEMS = 200  # per task, plain form
N_CHAT = 4  # per task, chat form
MIN_ACCURACY = 0.9


def make_problem(task: str, rng: np.random.Generator) -> tuple[str, str]:
    n = int(rng.integers(1, DIGITS[task] + 1))
    if task == "add":
        m = int(rng.integers(1, DIGITS[task] + 1))
        a, b = (int(rng.integers(10 ** (k - 1) if k > 1 else 0, 10 ** k)) for k in (n, m))
        return f"add {a}+{b}", str(a + b)
    s = "".join(map(str, rng.integers(0, 10, n)))
    return f"{task} {s}", s[::-1] if task == "reverse" else "".join(sorted(s))


def render_chat(messages: list[dict]) -> str:
    config = json.loads((MODEL / "tokenizer_config.json").read_text())
    return jinja2.Environment().from_string(config["chat_template"]).render(
        messages=messages, add_generation_prompt=True, bos_token=config["bos_token"], eos_token=config["eos_token"])


@pytest.fixture(scope="module")
def net():
    return DeepseekV3.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(MODEL / "tokenizer.json"))


@pytest.fixture(scope="module")
def problems():
    """Fresh problems: per task, N_PROBLEMS plain and N_CHAT chat prompts -> (keys, prompts, answers)."""
    rng = np.random.default_rng(20240601)  # not the training seed's stream
    keys, prompts, expected = [], [], []
    for task in DIGITS:
        for form, n in (("plain", N_PROBLEMS), ("chat", N_CHAT)):
            for _ in range(n):
                question, solution = make_problem(task, rng)
                text = render_chat([{"role": "user", "content": question}]) if form == "chat" else BOS + question + "="
                keys.append((task, form))
                prompts.append(text)
                expected.append(solution)
    return keys, prompts, expected


def answer(net, tok, problems) -> dict:
    """{(task, form): [(expected, got), ...]} from one batched greedy run."""
    keys, prompts, expected = problems
    result = {}
    for key, want, got in zip(keys, expected, greedy(net, tok, prompts, 10, add_special_tokens=False)):
        result.setdefault(key, []).append((want, got))
    return result


@pytest.fixture(scope="module")
def answers(net, tok, problems):
    return answer(net, tok, problems)


def test_config_is_deepseek_v3_architecture():
    cfg = ModelConfig.from_json(MODEL)
    raw = json.loads((MODEL / "config.json").read_text())
    assert raw["rope_scaling"]["type"] == "yarn" and cfg.rope_factor > 1 and cfg.rope_mscale_all_dim
    assert cfg.q_lora_rank and cfg.kv_lora_rank
    assert 1 <= cfg.first_k_dense_replace < cfg.num_hidden_layers  # dense layer(s), then MoE layers
    assert cfg.n_routed_experts >= 16 and cfg.n_group >= 4 and cfg.topk_group < cfg.n_group
    assert cfg.num_experts_per_tok > 1 and cfg.n_shared_experts == 1
    assert raw["scoring_func"] == "sigmoid" and raw["topk_method"] == "noaux_tc"
    assert cfg.num_nextn_predict_layers == 1
    assert cfg.vocab_size == Tokenizer.from_file(str(MODEL / "tokenizer.json")).get_vocab_size()


def test_checkpoint_is_deepseek_fp8_release_format():
    cfg = ModelConfig.from_json(MODEL)
    files = SafetensorsDir(MODEL)
    mtp = cfg.num_hidden_layers  # the MTP module is stored as the layer after the main ones
    for name in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.1.mlp.experts.15.down_proj.weight",
                 f"model.layers.{mtp}.eh_proj.weight", f"model.layers.{mtp}.mlp.shared_experts.up_proj.weight"):
        assert files.info(name)[1] == "F8_E4M3", name
        assert files.info(name + "_scale_inv")[1] == "F32", name
    for name in ("enorm.weight", "hnorm.weight", "shared_head.head.weight", "embed_tokens.weight",
                 "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{mtp}.{name}" in files, name
    assert cfg.fp8_block_size == (128, 128)
    size = sum(f.stat().st_size for f in MODEL.glob("*.safetensors"))
    print(f"checkpoint: {size / 1e6:.1f} MB")
    assert size < 8e6


def test_mtp_module_shares_embedding_and_head_with_the_main_model():
    """DeepSeek-V3 trains its MTP module with the main model's embedding and output head; the
    checkpoint stores copies under the MTP layer, which must therefore be identical."""
    files = SafetensorsDir(MODEL)
    mtp = ModelConfig.from_json(MODEL).num_hidden_layers
    np.testing.assert_array_equal(files.raw(f"model.layers.{mtp}.embed_tokens.weight"),
                                  files.raw("model.embed_tokens.weight"))
    np.testing.assert_array_equal(files.raw(f"model.layers.{mtp}.shared_head.head.weight"), files.raw("lm_head.weight"))


def test_mtp_module_predicts_the_token_after_next(net, tok):
    """The MTP head was trained (auxiliary loss): from position i it predicts answer token i+2."""
    rng = np.random.default_rng(7)
    texts = [BOS + q + "=" + a + EOS for q, a in (make_problem(t, rng) for t in DIGITS for _ in range(16))]
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    tokens = np.full((len(ids), max(map(len, ids))), net.config.eos_token_id, np.int32)
    for row, i in enumerate(ids):
        tokens[row, :len(i)] = i
    predicted = np.asarray(net.mtp_forward(tokens)).argmax(-1)
    right = total = 0
    for row, (text, i) in enumerate(zip(texts, ids)):
        first = text.index("=") - len(BOS) + 2  # token index of the first answer digit (after bos)
        targets = range(first, len(i))  # the answer digits and eos
        right += sum(predicted[row, j - 2] == i[j] for j in targets)
        total += len(targets)
    print(f"MTP: {right / total:.1%} of answer tokens predicted two positions ahead")
    assert right / total >= 0.9


def test_routing_bias_was_balanced_during_training(net):
    """Auxiliary-loss-free balancing moves every bias by +-gamma per step, so trained biases are
    spread out; an untrained (all-zero) bias would mean the rule never ran."""
    for bias in (net.moe_layers.mlp.gate.e_score_correction_bias[...], net.mtp.mlp.gate.e_score_correction_bias[...]):
        assert float(jnp.std(bias, axis=-1).min()) > 1e-3


def test_tokenizer_is_character_level_with_deepseek_specials(tok):
    cfg = ModelConfig.from_json(MODEL)
    assert tok.token_to_id(BOS) == cfg.bos_token_id == 0 and tok.token_to_id(EOS) == cfg.eos_token_id == 1
    assert tok.token_to_id(USER) is not None and tok.token_to_id(ASSISTANT) is not None
    enc = tok.encode("add 12+3=")
    assert enc.tokens == [BOS, "a", "d", "d", " ", "1", "2", "+", "3", "="]  # bos added, one token per char
    assert tok.decode(enc.ids) == "add 12+3="
    text = f"{BOS}{USER}sort 31{ASSISTANT}13{EOS}"
    assert tok.encode(text, add_special_tokens=False).tokens == [BOS, USER, "s", "o", "r", "t", " ", "3", "1",
                                                                ASSISTANT, "1", "3", EOS]


def test_chat_template_is_deepseek_style():
    messages = [{"role": "user", "content": "sort 31"}, {"role": "assistant", "content": "13"},
                {"role": "user", "content": "reverse 12"}]
    assert render_chat(messages) == f"{BOS}{USER}sort 31{ASSISTANT}13{EOS}{USER}reverse 12{ASSISTANT}"


@pytest.mark.parametrize("task", list(DIGITS))
def test_greedy_answers_are_exact(answers, task):
    pairs = answers[(task, "plain")]
    accuracy = np.mean([want == got for want, got in pairs])
    print(f"{task}: {accuracy:.1%} exact over {len(pairs)} fresh problems (1-{DIGITS[task]} digits)")
    assert accuracy >= MIN_ACCURACY, [p for p in pairs if p[0] != p[1]]


@pytest.mark.parametrize("where", ["one-device", "EP8"])
def test_fp8_mode_answers_as_well_as_none_mode(answers, tok, problems, where):
    """Quantization fp8 (the FP8 weights as shipped, activations quantised 1x128 before every FP8 GEMM;
    on EP8 the dispatch carries them) answers within one point of none mode on 200 problems a task."""
    from sharding.deployment import Deployment
    # the worst-case capacity bucket from the start: the digit tasks route unevenly, and the step
    # would otherwise overflow and compile twice more on its way there
    ep8 = Deployment(name="ep8", dp=8, redundant_experts=8, dispatch_dtype="fp8", capacity_factors=(None,))
    net = DeepseekV3.from_pretrained(MODEL, quantization="fp8", deployment=ep8 if where == "EP8" else None)
    fp8 = answer(net, tok, problems)
    for task in DIGITS:
        right = [sum(want == got for want, got in result[(task, "plain")]) for result in (answers, fp8)]
        print(f"{task} ({where}): none {right[0]}/{N_PROBLEMS}, fp8 {right[1]}/{N_PROBLEMS}")
        assert abs(right[0] - right[1]) <= N_PROBLEMS // 100  # one point


def test_chat_form_answers(answers):
    pairs = [p for task in DIGITS for p in answers[(task, "chat")]]
    wrong = [p for p in pairs if p[0] != p[1]]
    assert len(wrong) <= 1, wrong


def test_training_kernel_matches_the_models_moe():
    """train_tiny.py trains through the model's tiled expert layout in place of lax.ragged_dot (slow on
    XLA:CPU); it must compute the contiguous layout's numbers, and gradients, for any routing,
    padding rows included."""
    import jax

    rng = np.random.default_rng(0)
    M, D, F, E, k = 50, 16, 8, 6, 3
    rows = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    ids = rng.integers(0, E, (M, k))
    ids[:7] = -1  # padding tokens
    ids[7:20] = [0, 1, 2]  # a hot expert set
    ids = jnp.asarray(ids, jnp.int32)
    weights = jnp.asarray(rng.random((M, k)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s), jnp.float32) * 0.3 for s in ((E, F, D), (E, F, D), (E, D, F))]

    def tiled(x, ids, weights, *w):
        return grouped_ffn(x, ids, weights, ExpertWeights(*w), "tiles", tile=8)  # several tiles per expert

    def ragged(x, ids, weights, *w):
        return grouped_ffn(x, ids, weights, ExpertWeights(*w), "contiguous")
    for ffn_out, ref_out in zip(tiled(rows, ids, weights, *w), ragged(rows, ids, weights, *w)):
        np.testing.assert_allclose(ffn_out, ref_out, atol=1e-5)

    def loss(ffn, x, *ws):
        return (ffn(x, ids, weights, *ws)[0] ** 2).sum()
    got = jax.grad(lambda *a: loss(tiled, *a), argnums=(0, 1, 2, 3))(rows, *w)
    want = jax.grad(lambda *a: loss(ragged, *a), argnums=(0, 1, 2, 3))(rows, *w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
