"""Reference checkpoints made with transformers' DeepseekV3ForCausalLM (the parity oracle)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_config(**overrides) -> DeepseekV3Config:
    """>= 2 expert groups with topk_group < n_group, a dense first layer, YaRN, q_lora_rank set."""
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, n_group=4,
              topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
              qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20, max_position_embeddings=256,
              routed_scaling_factor=2.5, initializer_range=0.08, rope_parameters=dict(YARN), num_mtp_layers=0,
              attn_implementation="eager")
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def make_checkpoint(path: Path, cfg: DeepseekV3Config, seed: int = 0) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:  # HF initialises the correction bias to zero; make it matter
                gate.e_score_correction_bias.uniform_(0.0, 0.2)
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens: np.ndarray, lengths=None) -> np.ndarray:
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    mask = None
    if lengths is not None:
        mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def quantize_fp8_torch(w: torch.Tensor, block: tuple[int, int]):
    """An independent block quantiser (torch) for re-saving a checkpoint the way DeepSeek ships it."""
    M, N = w.shape
    bm, bn = block
    rows, cols = math.ceil(M / bm), math.ceil(N / bn)
    scale = torch.ones(rows, cols, dtype=torch.float32)
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float()
            amax = blk.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8_torch(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    bm, bn = block
    s = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:q.shape[0], :q.shape[1]]
    return q.float() * s


def resave_fp8(src: Path, dst: Path, block: tuple[int, int], n_shards: int = 3) -> DeepseekV3ForCausalLM:
    """Re-saves src in DeepSeek's FP8 release form (e4m3 projections + weight_scale_inv, several shards
    with an index). Returns transformers' model holding the dequantised weights: the reference."""
    tensors = load_file(src / "model.safetensors")
    out, reference = {}, {}
    for name, w in tensors.items():
        if w.ndim == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight")):
            q, s = quantize_fp8_torch(w, block)
            out[name], out[name + "_scale_inv"] = q, s
            reference[name] = dequantize_fp8_torch(q, s, block)
        else:
            out[name] = reference[name] = w
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(out)
    weight_map = {}
    for i in range(n_shards):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: out[n].contiguous() for n in names[i::n_shards]}
        save_file(part, dst / file)
        weight_map.update(dict.fromkeys(part, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    ref_dir = dst.parent / (dst.name + "-dequantised")
    ref_dir.mkdir()
    save_file({n: t.contiguous() for n, t in reference.items()}, ref_dir / "model.safetensors")
    (ref_dir / "config.json").write_text((src / "config.json").read_text())
    return DeepseekV3ForCausalLM.from_pretrained(ref_dir, attn_implementation="eager").eval()
