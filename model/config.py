"""ModelConfig: DeepSeek-V3's hyper-parameters, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that is missing, malformed, or describes a model we do not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # each routed expert; the shared expert is n_shared_experts times wider
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    kv_lora_rank: int
    q_lora_rank: int | None  # None: a single q_proj (DeepSeek-V2-Lite style)
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN (rope_type "yarn"); "default" is plain RoPE and ignores the rest.
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0  # MTP modules stored after the main layers
    fp8_block_size: tuple[int, int] | None = None  # from quantization_config.weight_block_size
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            problems.append(f"first_k_dense_replace={self.first_k_dense_replace} is outside [0, num_hidden_layers]")
        if self.n_moe_layers:
            if self.n_routed_experts % self.n_group:
                problems.append(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            elif self.n_routed_experts // self.n_group < 2:
                problems.append("each expert group needs >= 2 experts (groups are scored by their top-2)")
            if not 1 <= self.topk_group <= self.n_group:
                problems.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if not 1 <= self.num_experts_per_tok <= self.topk_group * self.n_routed_experts // self.n_group:
                problems.append(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in "
                                f"topk_group={self.topk_group} groups")
        if self.rope_type not in ("default", "yarn"):
            problems.append(f"rope_type {self.rope_type!r} is not supported (use 'default' or 'yarn')")
        if problems:
            raise ConfigError("; ".join(problems))

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def n_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def yarn_attention_factor(self) -> float:
        """Multiplies cos/sin (HF's `attention_factor`); 1.0 for DeepSeek-V3 since mscale == mscale_all_dim."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        if self.rope_mscale and self.rope_mscale_all_dim:
            return _yarn_mscale(self.rope_factor, self.rope_mscale) / _yarn_mscale(self.rope_factor,
                                                                                    self.rope_mscale_all_dim)
        return _yarn_mscale(self.rope_factor)

    @property
    def softmax_scale(self) -> float:
        # YaRN stretches attention entropy at long context; DeepSeek compensates in the logit scale.
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn" and self.rope_mscale_all_dim:
            scale *= _yarn_mscale(self.rope_factor, self.rope_mscale_all_dim) ** 2
        return scale

    # ---- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: model config not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        def need(key, kind=int):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"required field '{key}' is missing")
            return _typed(key, raw[key], kind)

        def opt(key, default, kind=int):
            return default if raw.get(key) is None else _typed(key, raw[key], kind)

        if opt("moe_layer_freq", 1) != 1:
            raise ConfigError(f"field 'moe_layer_freq'={raw['moe_layer_freq']} is not supported (DeepSeek-V3 uses 1)")
        if raw.get("scoring_func", "sigmoid") != "sigmoid":
            raise ConfigError(f"field 'scoring_func'={raw['scoring_func']!r} is not supported (DeepSeek-V3: 'sigmoid')")
        rope = _rope_fields(raw)
        quant = raw.get("quantization_config") or {}
        block = quant.get("weight_block_size")
        if block is not None and (not isinstance(block, list) or len(block) != 2):
            raise ConfigError(f"field 'quantization_config.weight_block_size' must be [rows, cols], got {block!r}")
        eos = raw.get("eos_token_id", 1)
        num_layers = need("num_hidden_layers")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=opt("moe_intermediate_size", 0),
            num_hidden_layers=num_layers,
            num_attention_heads=need("num_attention_heads"),
            n_routed_experts=opt("n_routed_experts", 0),
            n_shared_experts=opt("n_shared_experts", 0),
            num_experts_per_tok=opt("num_experts_per_tok", 0),
            n_group=opt("n_group", 1),
            topk_group=opt("topk_group", 1),
            first_k_dense_replace=opt("first_k_dense_replace", num_layers if not raw.get("n_routed_experts") else 0),
            routed_scaling_factor=opt("routed_scaling_factor", 1.0, float),
            norm_topk_prob=opt("norm_topk_prob", True, bool),
            kv_lora_rank=need("kv_lora_rank"),
            q_lora_rank=opt("q_lora_rank", None),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            max_position_embeddings=need("max_position_embeddings"),
            rms_norm_eps=opt("rms_norm_eps", 1e-6, float),
            tie_word_embeddings=opt("tie_word_embeddings", False, bool),
            num_nextn_predict_layers=opt("num_nextn_predict_layers", opt("num_mtp_layers", 0)),
            fp8_block_size=tuple(int(b) for b in block) if block else None,
            bos_token_id=opt("bos_token_id", None),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            **rope,
        )

    def to_dict(self) -> dict:
        """The HF config.json form (rope in `rope_scaling`, as DeepSeek's release writes it)."""
        out = {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith(("rope_", "fp8_"))},
            "rope_theta": self.rope_theta, "moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "num_key_value_heads": self.num_attention_heads, "hidden_act": "silu",
        }
        out["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        if self.rope_type == "yarn":
            out["rope_scaling"] = {
                "type": "yarn", "factor": self.rope_factor, "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow, "mscale": self.rope_mscale, "mscale_all_dim": self.rope_mscale_all_dim,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            }
            if self.rope_attention_factor is not None:
                out["rope_scaling"]["attention_factor"] = self.rope_attention_factor
        if self.fp8_block_size:
            out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": list(self.fp8_block_size)}
        return out

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _typed(key, value, kind):
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"field '{key}' must be {kind.__name__}, got {value!r}")
    return kind(value)


def _rope_fields(raw: dict) -> dict:
    """Accepts both the legacy `rope_scaling` block and transformers 5's `rope_parameters`."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"field 'rope_scaling'/'rope_parameters' must be an object, got {rope!r}")
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": _typed("rope_theta", theta, float), "rope_type": kind}
    if kind != "yarn":
        return out
    if rope.get("factor") is None:
        raise ConfigError("field 'rope_scaling.factor' is required for YaRN")
    original = rope.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
    out.update(
        rope_factor=_typed("rope_scaling.factor", rope["factor"], float),
        rope_original_max_position_embeddings=_typed("rope_scaling.original_max_position_embeddings", original, int),
        rope_beta_fast=_typed("rope_scaling.beta_fast", rope.get("beta_fast") or 32, float),
        rope_beta_slow=_typed("rope_scaling.beta_slow", rope.get("beta_slow") or 1, float),
        rope_mscale=rope.get("mscale"),
        rope_mscale_all_dim=rope.get("mscale_all_dim"),
        rope_attention_factor=rope.get("attention_factor"),
        rope_truncate=bool(rope.get("truncate", True)),
    )
    return out
