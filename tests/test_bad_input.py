"""Bad checkpoints and bad tokens fail with one sentence naming the file, tensor or field."""

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tiny import TINY, save_tiny
from model.checkpoint import CheckpointError, SafetensorsDir, write_safetensors
from model import ConfigError, DeepseekV3, ModelConfig



@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    return path, save_tiny(path, 0)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensor(path: Path, name: str, new):
    """Replaces (or, with new=None, deletes) one tensor in whichever shard holds it."""
    files = SafetensorsDir(path)
    file = files.entries[name][0]
    tensors = {n: np.array(files.raw(n)) for n, (f, _) in files.entries.items() if f == file}
    if new is None:
        del tensors[name]
    else:
        tensors[name] = new
    del files
    write_safetensors(file, tensors)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: model config not found"):
        DeepseekV3.from_pretrained(tmp_path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", None, "required field 'hidden_size' is missing"),
    ("n_group", 3, "n_routed_experts=16 is not divisible by n_group=3"),
    ("num_hidden_layers", "three", "field 'num_hidden_layers' must be int"),
    ("moe_layer_freq", 2, "field 'moe_layer_freq'=2 is not supported"),
])
def test_bad_config_field(tmp_path, field, value, message):
    raw = json.loads(TINY.read_text())
    if value is None:
        del raw[field]
    else:
        raw[field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_json(tmp_path / "config.json")
    assert message in str(err.value) and str(tmp_path / "config.json") in str(err.value)


def test_missing_tensor(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    _rewrite_tensor(path, "model.layers.2.mlp.experts.5.down_proj.weight", None)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight' is missing"):
        DeepseekV3.from_pretrained(path)


def test_wrong_shape(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    _rewrite_tensor(path, "model.layers.0.self_attn.kv_b_proj.weight", np.zeros((7, 32), np.float32))
    with pytest.raises(CheckpointError) as err:
        DeepseekV3.from_pretrained(path)
    msg = str(err.value)
    assert "'model.layers.0.self_attn.kv_b_proj.weight' has shape [7, 32], expected [256, 32]" in msg
    assert ".safetensors" in msg  # names the file


def test_wrong_dtype(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    _rewrite_tensor(path, "model.norm.weight", np.ones(64, np.int32))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has dtype I32, expected a floating-point"):
        DeepseekV3.from_pretrained(path)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_fp8_without_scale(saved, tmp_path, quantization):
    """Neither dequantisable nor usable as FP8: its real values are unknown."""
    path = _copy(saved[0], tmp_path / "c")
    name = "model.layers.1.self_attn.o_proj.weight"
    w = np.array(SafetensorsDir(path).raw(name))
    _rewrite_tensor(path, name, w.astype(ml_dtypes.float8_e4m3fn))
    with pytest.raises(CheckpointError, match=rf"FP8 tensor '{name}' has no '{name}_scale_inv'"):
        DeepseekV3.from_pretrained(path, quantization=quantization)


def test_unknown_quantization(saved, tmp_path):
    import subprocess
    import sys

    from serving import LLM
    from sharding.deployment import Deployment
    message = r"quantization 'int8' is not one of 'fp8', 'none'"
    with pytest.raises(ValueError, match=message):
        DeepseekV3.from_pretrained(saved[0], quantization="int8")
    with pytest.raises(ValueError, match=message):
        LLM(saved[0], quantization="int8")
    (tmp_path / "dep.json").write_text('{"mesh": {"dp": 1}, "quantization": "int8"}')
    with pytest.raises(ValueError, match=rf"dep\.json: {message}"):
        Deployment.from_json(tmp_path / "dep.json")
    run = subprocess.run([sys.executable, "-m", "serving.generate", "--quantization", "int8", "--prompt", "x"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert run.returncode == 2 and "argument --quantization: invalid choice: 'int8'" in run.stderr


def test_truncated_file(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "c")
    shard = sorted(path.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="extends past the end of the file"):
        DeepseekV3.from_pretrained(path)


@pytest.mark.parametrize("tokens,message", [
    ([[1, 2, 128]], r"token id 128 is outside the vocabulary \[0, 128\)"),
    ([[-1, 2]], r"token id -1 is outside the vocabulary"),
    ([1, 2, 3], r"tokens must be an integer array \[batch, seq\]"),
])
def test_token_ids_checked(saved, tokens, message):
    with pytest.raises(ValueError, match=message):
        saved[1](np.array(tokens))


def test_positions_past_the_cache_are_refused_not_dropped(saved):
    net = saved[1]
    cache = net.init_cache(2, 8)
    with pytest.raises(ValueError, match="position 8 is past the cache of 8 slots per sequence"):
        net.decode([3, 4], [2, 8], cache)
    with pytest.raises(ValueError, match="position 9 is past the cache of 8 slots per sequence"):
        net.prefill(np.array([[3, 4, 5], [6, 7, 8]]), [3, 2], cache, start=[0, 8])
    with pytest.raises(ValueError, match="position 8 is past the cache of 8 slots per sequence"):
        cache.write(0, np.array([[8]]), np.zeros((1, 1, cache.data.shape[-1]), np.float32))
