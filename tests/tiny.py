"""The tiny random DeepSeek-V3-architecture model most tests run on (configs/tiny: 3 layers, one
dense, 16 routed experts in 4 groups, top-4, 1 MTP layer)."""

from pathlib import Path

from flax import nnx

from model import DeepseekV3, ModelConfig
from model.checkpoint import save_safetensors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "tiny" / "config.json"


def tiny_net(seed: int) -> DeepseekV3:
    return DeepseekV3(ModelConfig.from_json(TINY), rngs=nnx.Rngs(seed))


def save_tiny(path: Path, seed: int) -> DeepseekV3:
    """A seeded random tiny model written in DeepSeek's release format to path; returns it."""
    net = tiny_net(seed)
    save_safetensors(net, path)
    return net
