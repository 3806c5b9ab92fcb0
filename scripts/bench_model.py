"""A random-weight DeepSeek-V3 checkpoint of the shapes issue 31 compares against jax-llm-examples'
deepseek_r1_jax (scripts/bench_peer.py) and measures the engine's step on (scripts/bench_engine.py
--shapes issue31): 4 layers (1 dense, 3 MoE), vocabulary 1,024, hidden 256, 32 routed experts in
4 groups, 4 per token, MLA q_lora 64 / kv_lora 128, 8 heads, a 4,096-token context, no MTP module.
The dims the issue does not name are those of the peer's own small test model (tests/test_model.py:
ffw 128, expert ffw 64, qk_nope 56, qk_rope 48, v 16). Written once per directory and reused."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ISSUE31 = {  # the HF config.json fields that differ from configs/tiny
    "num_hidden_layers": 4, "first_k_dense_replace": 1, "vocab_size": 1024, "hidden_size": 256,
    "intermediate_size": 128, "moe_intermediate_size": 64, "n_routed_experts": 32, "num_experts_per_tok": 4,
    "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "q_lora_rank": 64, "kv_lora_rank": 128,
    "num_attention_heads": 8, "num_key_value_heads": 8, "qk_nope_head_dim": 56, "qk_rope_head_dim": 48,
    "v_head_dim": 16, "max_position_embeddings": 4096, "num_nextn_predict_layers": 0,
}


def issue31_config() -> dict:
    raw = json.loads((ROOT / "configs" / "tiny" / "config.json").read_text())
    raw.update(ISSUE31)
    raw["rope_scaling"] = dict(raw.get("rope_scaling") or {}, original_max_position_embeddings=1024)
    raw.pop("quantization_config", None)  # float weights: the peer runs them unquantized too
    return raw


def issue31_checkpoint(path: Path, seed: int = 0) -> Path:
    """The checkpoint in `path` (written there first if it is not): config.json + safetensors."""
    path = Path(path)
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()) == issue31_config():
        return path
    from flax import nnx

    from model import DeepseekV3, ModelConfig
    from model.checkpoint import save_safetensors
    path.mkdir(parents=True, exist_ok=True)
    net = DeepseekV3(ModelConfig.from_dict(issue31_config()), rngs=nnx.Rngs(seed))
    save_safetensors(net, path)
    (path / "config.json").write_text(json.dumps(issue31_config(), indent=1))
    return path
