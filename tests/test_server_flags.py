"""vLLM's command line and request defaults without an engine (serving/server/cli.py, protocol.py):
-tp / -dp / --max-model-len reshape the deployment, generation_config.json's defaults apply unless
a request sets the field (--generation-config vllm: none), --chat-template takes a file or a
template, the parsers refuse a tokenizer that cannot spell their markers, and the flags parse."""

import argparse
import json

import pytest

from serving.api import Tokenizer
from serving.server.cli import chat_template, check_parsers, deployment, generation_defaults, parser
from serving.server.errors import ApiError
from serving.server.protocol import Options, Protocol
from server_util import ROOT, TINY_MODEL


def flags(*argv) -> argparse.Namespace:
    return parser().parse_args(list(argv))


def test_vllm_flags_reshape_the_deployment():
    assert deployment(flags("--deployment", "configs/deploy/cpu8.json"), TINY_MODEL) == "configs/deploy/cpu8.json"
    d = deployment(flags("-dp", "2", "--max-model-len", "96", "--enable-expert-parallel", "--trust-remote-code"),
                   TINY_MODEL)
    assert (d.dp, d.tp, d.serving.max_model_len) == (2, 1, 96)
    d = deployment(flags("--deployment", str(ROOT / "configs/deploy/cpu8.json"), "-dp", "4", "-tp", "2"), TINY_MODEL)
    assert (d.dp, d.tp, d.serving.prefill_rows) == (4, 2, (1, 4)) and d.n_physical_experts(16) % 8 == 0
    with pytest.raises(ValueError, match="single-slice"):
        deployment(flags("--deployment", str(ROOT / "configs/deploy/cpu8-disagg.json"), "-dp", "2"), TINY_MODEL)
    disagg = deployment(flags("--deployment", str(ROOT / "configs/deploy/cpu8-disagg.json"), "--max-model-len", "64"),
                        TINY_MODEL)
    assert disagg.prefill.serving.max_model_len == disagg.decode.serving.max_model_len == 64
    assert flags("--max-num-batched-tokens", "512").max_num_batched_tokens == 512


def test_context_defaults_to_the_models_and_a_longer_one_is_refused():
    """vLLM's default: the model's max_position_embeddings (what /v1/models reports as max_model_len);
    --max-model-len lowers it; above the model's it is refused in one sentence."""
    from sharding.deployment import Deployment, ServingConfig, with_serving
    assert ServingConfig().context_len(163840) == 163840
    assert ServingConfig(max_model_len=4096).context_len(163840) == 4096
    with pytest.raises(ValueError, match=r"serving.max_model_len 200000 is more than the model's context of 163840 "
                                         r"tokens \(max_position_embeddings\); lower it or leave it out"):
        ServingConfig(max_model_len=200000).context_len(163840)
    d = with_serving(Deployment(name="x", dp=1), max_model_len=96, max_num_batched_tokens=None)
    assert (d.serving.max_model_len, d.serving.token_budget()) == (96, 4 * 256)
    with pytest.raises(ValueError, match="serving.max_num_batched_tokens must be a positive integer, got 0"):
        ServingConfig(max_num_batched_tokens=0)


def test_flags_parse():
    args = flags("--seed", "3", "--generation-config", "vllm", "--reasoning-parser", "deepseek_r1",
                 "--tool-call-parser", "deepseek_v3", "--enable-auto-tool-choice", "-tp", "1")
    assert (args.seed, args.tensor_parallel_size, args.enable_auto_tool_choice) == (3, 1, True)


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "do_sample": True, "max_new_tokens": 7, "bos_token_id": 0}))
    defaults = generation_defaults(str(tmp_path), TINY_MODEL)
    assert defaults == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 7}
    assert generation_defaults("vllm", tmp_path) == {} and generation_defaults("auto", TINY_MODEL) == {}
    with pytest.raises(ValueError, match="no generation_config.json"):
        generation_defaults(str(tmp_path / "nowhere"), TINY_MODEL)
    p = Protocol(Tokenizer(TINY_MODEL), 128, 101, 0, ["m"], options=Options(defaults=defaults))
    free = p.prepare(json.dumps({"prompt": "sort 21="}).encode(), chat=False).params[0]
    assert (free.temperature, free.top_p, free.max_tokens) == (0.6, 0.95, 7)
    set_ = p.prepare(json.dumps({"prompt": "sort 21=", "temperature": 0, "max_tokens": 3}).encode(), False).params[0]
    assert (set_.temperature, set_.top_p, set_.max_tokens) == (0, 0.95, 3)
    plain = Protocol(Tokenizer(TINY_MODEL), 128, 101, 0, ["m"]).prepare(b'{"prompt": "x"}', False).params[0]
    assert (plain.temperature, plain.top_p, plain.max_tokens) == (1.0, 1.0, 16)  # OpenAI's
    # min_tokens is checked against each prompt's own max_tokens
    assert p.prepare(b'{"prompt": "x", "max_tokens": 60, "min_tokens": 40}', False).params[0].min_tokens == 40
    with pytest.raises(ApiError, match="min_tokens"):
        p.prepare(b'{"prompt": "x", "max_tokens": 6, "min_tokens": 40}', False)


def test_chat_template_flag_and_parser_markers(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert chat_template(str(tmp_path / "t.jinja")) == "{{ messages[0]['content'] }}"
    assert chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}").startswith("{% for")
    with pytest.raises(ValueError, match="no such file"):
        chat_template(str(tmp_path / "missing.jinja"))
    tok = Tokenizer(TINY_MODEL)
    check_parsers(tok, flags("--reasoning-parser", "deepseek_r1"))  # <think> is spelled by its characters
    with pytest.raises(ValueError, match="--tool-call-parser: this model's tokenizer cannot spell"):
        check_parsers(tok, flags("--tool-call-parser", "deepseek_v3"))
