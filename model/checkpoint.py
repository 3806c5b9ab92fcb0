"""Checkpoints: Hugging Face safetensors (BF16/FP32, or DeepSeek's FP8 + weight_scale_inv) and Orbax.

Loading builds each parameter with `jax.make_array_from_callback`, reading every device's shard
from the memory-mapped safetensors files (model/safetensors.py) one checkpoint tensor at a time.
A model in quantization "fp8" takes FP8 tensors and their scales as stored (re-blocked to 128x128
if the checkpoint used other blocks) and quantises BF16/FP32 ones at load; in "none" FP8 tensors
are dequantised to the model dtype.
"""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ConfigError, ModelConfig
from model.moe import default_placement
from model.quant import FP8, WEIGHT_BLOCK, default_quantization, dequantize_blocks, dequantize_weight, \
    hold_scales, quantize_blocks, real_scales, scale_shape
from model.safetensors import FLOAT_DTYPES, CheckpointError, SafetensorsDir, write_safetensors

log = logging.getLogger(__name__)

ORBAX_DIR = "orbax"  # inside a directory written by DeepseekV3.save, beside config.json
LAYOUT_FILE = "jaxseek.json"  # beside them: the physical expert count and quantization of the saved state
SCALE = "_scale_inv"  # DeepSeek's name for a weight's block scales: `<weight name>_scale_inv`

# ---- one name map: our parameter paths <-> DeepSeek's tensor names -------------------------------

def _stack_offsets(cfg: ModelConfig) -> dict[str, int]:
    return {"dense_layers": 0, "moe_layers": cfg.n_dense_layers, "mtp": cfg.num_hidden_layers}


def stacked_dims(path: tuple[str, ...]) -> int:
    """How many leading axes of this parameter index separate checkpoint tensors (layer, expert)."""
    return int(path[0] in ("dense_layers", "moe_layers", "mtp")) + int("experts" in path)


def tensor_name(cfg: ModelConfig, path: tuple[str, ...], index: tuple[int, ...] = ()) -> str:
    """('moe_layers', 'mlp', 'experts', 'up_proj', 'weight'), (2, 5) -> 'model.layers.{k+2}.mlp.experts.5.up_proj.weight'."""
    path = list(path)
    if path[0] == "lm_head":
        return "lm_head.weight"
    offsets = _stack_offsets(cfg)
    if path[0] not in offsets:
        return "model." + ".".join(path)
    layer, rest, index = offsets[path[0]] + index[0], path[1:], index[1:]
    if "experts" in rest:
        rest.insert(rest.index("experts") + 1, str(index[0]))
    return f"model.layers.{layer}." + ".".join(rest)


def _key_path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in key_path)


def _leaves(pure: dict) -> list[tuple[tuple[str, ...], object]]:
    return [(_key_path(kp), leaf) for kp, leaf in jax.tree_util.tree_leaves_with_path(pure)]


def hf_tensors(net):
    """Yields (DeepSeek tensor name, host array) for every parameter of a DeepseekV3, one checkpoint
    tensor at a time; a routed expert is written once, from its first replica."""
    leaves = dict(_leaves(nnx.to_pure_dict(nnx.state(net, nnx.Param))))
    for path, value in leaves.items():
        if path[-1] == "weight_scale_inv":  # the checkpoint's shape, not the held layout's (model/quant.py)
            value = real_scales(value, leaves[path[:-1] + ("weight",)].shape[-1])
        if "experts" in path:
            log2phy = np.asarray(getattr(net, path[0]).mlp.log2phy[...])  # [L, E, max replicas]
            for layer, expert in np.ndindex(*log2phy.shape[:2]):
                yield (tensor_name(net.config, path, (layer, expert)),
                       np.asarray(value[layer, log2phy[layer, expert, 0]]))
            continue
        for index in np.ndindex(*value.shape[:stacked_dims(path)]):
            yield tensor_name(net.config, path, index), np.asarray(value[index])


def save_safetensors(net, path, fp8: bool = False, shard_bytes: int = 2 ** 30) -> None:
    """Writes DeepSeek's release format: config.json, safetensors shards and their index. With fp8 (or
    from a model in quantization "fp8", whose weights are FP8 already), every projection matrix is
    stored as e4m3 + weight_scale_inv per block, as DeepSeek ships V3 (embeddings, heads, norms, the
    gate and its bias stay in their own dtype)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = net.config
    if net.quantization == "fp8":  # the device format's blocks, whatever the source checkpoint used
        cfg = cfg.replace(fp8_block_size=WEIGHT_BLOCK)
    elif fp8:
        cfg = cfg.replace(fp8_block_size=cfg.fp8_block_size or WEIGHT_BLOCK)
    shards: list[dict[str, np.ndarray]] = [{}]
    for name, arr in hf_tensors(net):
        if fp8 and arr.dtype != FP8 and _is_fp8_weight(name, arr):
            q, scale_inv = quantize_blocks(arr, cfg.fp8_block_size)
            pieces = {name: q, name + SCALE: scale_inv}
        else:
            pieces = {name: arr}
        if sum(a.nbytes for a in shards[-1].values()) + sum(a.nbytes for a in pieces.values()) > shard_bytes:
            shards.append({})
        shards[-1].update(pieces)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / file, shard)
        weight_map.update(dict.fromkeys(shard, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))


def _is_fp8_weight(name: str, arr: np.ndarray) -> bool:
    return arr.ndim == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


# ---- HF loading ----------------------------------------------------------------------------------

class _TensorReader:
    def __init__(self, files: SafetensorsDir, cfg: ModelConfig):
        self.files, self.cfg = files, cfg
        self.block = tuple(cfg.fp8_block_size or WEIGHT_BLOCK)
        # tensors quantised (or re-blocked) at load, recently used: each is read for its weight and
        # again for its scale, and once per device shard
        self._quantized: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.files:
            raise CheckpointError(f"{self.files.path}: tensor '{name}' is missing (expected shape {list(shape)})")
        file, dtype, got = self.files.info(name)
        if got != shape:
            raise CheckpointError(f"{file}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")
        if dtype == "F8_E4M3":
            scale = name + SCALE
            if scale not in self.files:
                raise CheckpointError(f"{file}: FP8 tensor '{name}' has no '{scale}' beside it")
            sfile, sdtype, sshape = self.files.info(scale)
            if sshape != scale_shape(shape, self.block) or sdtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{sfile}: tensor '{scale}' is {sdtype}{list(sshape)}, expected a float tensor "
                                      f"of shape {list(scale_shape(shape, self.block))} (blocks of {list(self.block)})")
        elif dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has dtype {dtype}, expected a floating-point tensor "
                                  f"({', '.join(FLOAT_DTYPES)} or F8_E4M3 with weight_scale_inv)")

    def _real(self, name: str) -> np.ndarray:
        """The tensor's values: FP8 dequantised with the checkpoint's blocks."""
        raw = self.files.raw(name)
        if raw.dtype == FP8:
            return dequantize_blocks(raw, self.files.raw(name + SCALE), self.block, np.float32)
        return raw

    def read(self, name: str, dtype, index: tuple[slice, ...], part: str | None = None) -> np.ndarray:
        """part None: the tensor's values in dtype; "q" / "scale": its 128x128 FP8 form (as stored when
        the checkpoint has it, else quantised here)."""
        if part is None:
            return np.asarray(self._real(name)[index], dtype=dtype)
        raw = self.files.raw(name)
        if raw.dtype == FP8 and self.block == WEIGHT_BLOCK:
            stored = raw if part == "q" else hold_scales(np.asarray(self.files.raw(name + SCALE), np.float32))
            return np.asarray(stored[index], dtype=dtype)
        if name not in self._quantized:
            q, scale = quantize_blocks(np.asarray(self._real(name), np.float32))
            self._quantized[name] = q, hold_scales(scale)  # (scales in the held layout: model/quant.py)
            if len(self._quantized) > 8:
                self._quantized.popitem(last=False)
        return np.asarray(self._quantized[name][part == "scale"][index], dtype=dtype)

    @property
    def fp8(self) -> bool:
        return any(info["dtype"] == "F8_E4M3" for _, info in self.files.entries.values())


def _derived(path: tuple[str, ...]) -> bool:
    """Weights made from others at load (model/layers.py: Derived; DeepseekV3.refresh_derived), not read."""
    return "absorbed" in path


def _load_leaf(reader: _TensorReader, cfg, placement, path, abstract, sharding) -> jax.Array:
    if _derived(path):  # where it goes: refresh_derived computes it from the loaded weights
        return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=sharding)
    if path[-1] in placement:  # expert maps are not in the checkpoint: every layer starts at the default
        return jax.device_put(np.broadcast_to(placement[path[-1]], abstract.shape).astype(abstract.dtype), sharding)
    n_stacked = stacked_dims(path)
    stack_shape, tensor_shape = abstract.shape[:n_stacked], tuple(abstract.shape[n_stacked:])
    # an FP8 parameter reads its weight's tensor: the e4m3 values, or (weight_scale_inv) their scales
    part = "scale" if path[-1] == "weight_scale_inv" else "q" if abstract.dtype == FP8 else None
    tensor_path = path[:-1] + ("weight",) if part == "scale" else path

    def name(stack_index):  # a physical expert slot reads its logical expert's tensor
        if "experts" in path:
            stack_index = (stack_index[0], int(placement["phy2log"][stack_index[1]]))
        return tensor_name(cfg, tensor_path, stack_index)

    if part != "scale":  # (the weight's own check covers its scales)
        for index in np.ndindex(*stack_shape):
            reader.check(name(index), tensor_shape)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        ranges = [range(*s.indices(n)) for s, n in zip(index[:n_stacked], stack_shape)]
        out = np.empty([len(r) for r in ranges] + [len(range(*s.indices(n))) for s, n in
                                                    zip(index[n_stacked:], tensor_shape)], abstract.dtype)
        for pos in np.ndindex(*out.shape[:n_stacked]):
            out[pos] = reader.read(name(tuple(r[i] for r, i in zip(ranges, pos))), abstract.dtype, index[n_stacked:],
                                   part)
        return out

    return jax.make_array_from_callback(abstract.shape, sharding, shard, dtype=abstract.dtype)


def _abstract(cls, cfg: ModelConfig, dtype, n_physical, quantization):
    return nnx.split(nnx.eval_shape(lambda: cls(cfg, dtype, nnx.Rngs(0), n_physical, quantization)))


def _shardings(abstract_state, mesh):
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, nnx.to_pure_dict(abstract_state))
    from sharding.mesh import param_shardings  # the rule table lives with the mesh
    return nnx.to_pure_dict(param_shardings(abstract_state, mesh))


def load(cls, path, dtype=jnp.float32, mesh=None, deployment=None, quantization=None):
    """A `cls` (DeepseekV3) loaded from a HF or Orbax directory; see DeepseekV3.from_pretrained."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    cfg = ModelConfig.from_json(path / "config.json")
    ep, n_physical, kernels = None, None, None
    platform = jax.devices()[0].platform  # no deployment: where the weights go
    if mesh is not None or deployment is not None:
        from model.kernels import registry
        from sharding.deployment import resolve
        deployment, mesh = resolve(deployment, mesh)
        platform = deployment.platform_for(mesh)  # decided once, here
        kernels = registry.resolve(deployment.kernels, platform, mesh.devices.flat[0])
        ep = deployment.ep_config(mesh, kernels)
        n_physical = deployment.n_physical_experts(cfg.n_routed_experts) if cfg.n_routed_experts else None
        quantization = quantization or deployment.quantization
    if (path / ORBAX_DIR).is_dir():
        net = _load_orbax(cls, path, cfg, dtype, mesh, n_physical, quantization, platform)
    else:
        net = _load_hf(cls, path, cfg, dtype, mesh, n_physical, quantization, platform)
    net.refresh_derived()
    net.set_expert_parallel(ep)
    if kernels is not None:
        net.set_kernels(kernels)
        net.compiler_options = tuple(sorted(deployment.xla_options(platform).items()))
    return net


def _load_hf(cls, path: Path, cfg: ModelConfig, dtype, mesh, n_physical, quantization, platform):
    files = SafetensorsDir(path)
    if cfg.n_mtp_layers and not any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in files.entries):
        # transformers' save_pretrained drops DeepSeek's MTP layer; serve without it.
        log.warning("%s: config has %d MTP layer(s) but the checkpoint holds none; loading without MTP",
                    path, cfg.n_mtp_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    reader = _TensorReader(files, cfg)
    graphdef, abstract = _abstract(cls, cfg, dtype, n_physical, default_quantization(quantization, reader.fp8, platform))
    placement = default_placement(cfg.n_routed_experts, n_physical or cfg.n_routed_experts) if cfg.n_moe_layers else {}
    shardings = _shardings(abstract, mesh)
    state = jax.tree_util.tree_map_with_path(
        lambda kp, a, s: _load_leaf(reader, cfg, placement, _key_path(kp), a, s), nnx.to_pure_dict(abstract),
        shardings)
    nnx.replace_by_pure_dict(abstract, state)
    return nnx.merge(graphdef, abstract)


# ---- Orbax ---------------------------------------------------------------------------------------

def save_orbax(net, path) -> None:
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(net.config.to_dict(), indent=2))
    (path / LAYOUT_FILE).write_text(json.dumps({"n_physical_experts": net.n_physical_experts,
                                                "quantization": net.quantization}))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / ORBAX_DIR, nnx.to_pure_dict(nnx.state(net)), force=True)
        ckptr.wait_until_finished()


def _load_orbax(cls, path: Path, cfg: ModelConfig, dtype, mesh, n_physical, quantization, platform):
    """Restores the exact state saved, physical expert slots and their placement included; then
    (de)quantises it if another quantization is asked for."""
    import orbax.checkpoint as ocp
    layout = json.loads((path / LAYOUT_FILE).read_text())
    saved, saved_quantization = layout["n_physical_experts"] or None, layout.get("quantization", "none")
    if n_physical is not None and saved != n_physical:
        raise CheckpointError(f"{path}: saved with {saved} physical experts per layer, but the deployment asks "
                              f"for {n_physical}; load it without a deployment, or re-export it with save_safetensors")
    graphdef, abstract = _abstract(cls, cfg, dtype, saved, saved_quantization)
    shardings = _shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path.absolute() / ORBAX_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path / ORBAX_DIR}: cannot restore onto {path / 'config.json'}'s model ({e})") from None
    quantization = default_quantization(quantization, saved_quantization == "fp8", platform)
    if quantization != saved_quantization:
        graphdef, abstract = _abstract(cls, cfg, dtype, saved, quantization)
        restored = _requantized(restored, nnx.to_pure_dict(abstract), _shardings(abstract, mesh))
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


def _requantized(saved: dict, target: dict, shardings: dict) -> dict:
    """A restored state in the other quantization (target: its abstract pure dict): FP8 weights
    dequantised, or float weights quantised into weight + weight_scale_inv, on device."""
    quantize = jax.jit(lambda w: quantize_blocks(w, xp=jnp))

    def leaf(key_path, abstract, sharding):
        path = _key_path(key_path)
        if _derived(path):  # made again from the requantised weights (load: refresh_derived)
            return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=sharding)
        parent = saved
        for key in path[:-1]:
            parent = parent[key]
        if path[-1] == "weight_scale_inv":
            value = hold_scales(quantize(parent["weight"])[1], jnp)
        elif path[-1] == "weight" and abstract.dtype == FP8 and parent["weight"].dtype != FP8:
            value = quantize(parent["weight"])[0]
        elif path[-1] == "weight" and parent["weight"].dtype == FP8 and abstract.dtype != FP8:
            value = jax.jit(dequantize_weight, static_argnums=2)(parent["weight"], parent["weight_scale_inv"],
                                                                 abstract.dtype)
        else:
            value = parent[path[-1]]
        return jax.device_put(value, sharding)

    return jax.tree_util.tree_map_with_path(leaf, target, shardings)


__all__ = ["CheckpointError", "ConfigError", "SafetensorsDir", "hf_tensors", "load", "save_orbax",
           "save_safetensors", "tensor_name", "write_safetensors"]
