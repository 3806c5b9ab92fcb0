"""Checkpoints: Hugging Face safetensors (BF16/FP32, or DeepSeek's FP8 + weight_scale_inv) and Orbax.

The safetensors reader parses each file's header and memory-maps it, so tensors are read one
slice at a time straight into the device shard that needs them: a 671B checkpoint never sits
whole in host memory (and numpy's safetensors loader cannot read F8_E4M3 anyway).
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from model.config import ConfigError, ModelConfig
from model.moe import default_placement
from model.quant import FP8, WEIGHT_BLOCK, dequantize_blocks, quantize_blocks, scale_shape
from model.transformer import DeepseekV3

log = logging.getLogger(__name__)

ORBAX_DIR = "orbax"  # inside a directory written by DeepseekV3.save, beside config.json
LAYOUT_FILE = "jaxseek.json"  # beside them: the physical expert count the state was saved with
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": FP8, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(ValueError):
    """A checkpoint that is missing a tensor, holds one of the wrong shape or dtype, or is unreadable."""


# ---- safetensors ---------------------------------------------------------------------------------

class SafetensorsDir:
    """Every tensor of a HF checkpoint directory, by name, read lazily through memory maps."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
        self.entries: dict[str, tuple[Path, dict]] = {}
        for name in files:
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {index.name} but missing")
            for tensor, info in _read_header(file).items():
                self.entries[tensor] = (file, info)
        self._maps: dict[Path, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def info(self, name: str) -> tuple[Path, str, tuple[int, ...]]:
        file, info = self.entries[name]
        return file, info["dtype"], tuple(info["shape"])

    def raw(self, name: str) -> np.ndarray:
        """The stored tensor as a read-only view of the memory-mapped file (no copy)."""
        file, info = self.entries[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        start = info["_data_start"]
        return self._maps[file][start + begin:start + end].view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(
            info["shape"])


def _read_header(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e!r})") from None
    size = file.stat().st_size
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {info.get('dtype')!r}")
        info["_data_start"] = 8 + n
        if 8 + n + info["data_offsets"][1] > size:
            raise CheckpointError(f"{file}: tensor '{name}' extends past the end of the file (truncated?)")
    return header


def write_safetensors(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes numpy arrays (FP8 and BF16 included) in the safetensors format."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


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


def hf_tensors(net: DeepseekV3):
    """Yields (DeepSeek tensor name, host array) for every parameter, one checkpoint tensor at a time;
    a routed expert is written once, from its first replica."""
    for path, value in _leaves(nnx.to_pure_dict(nnx.state(net, nnx.Param))):
        if "experts" in path:
            log2phy = np.asarray(getattr(net, path[0]).mlp.log2phy[...])  # [L, E, max replicas]
            for layer, expert in np.ndindex(*log2phy.shape[:2]):
                yield (tensor_name(net.config, path, (layer, expert)),
                       np.asarray(value[layer, log2phy[layer, expert, 0]]))
            continue
        for index in np.ndindex(*value.shape[:stacked_dims(path)]):
            yield tensor_name(net.config, path, index), np.asarray(value[index])


def save_safetensors(net: DeepseekV3, path, fp8: bool = False, shard_bytes: int = 2 ** 30) -> None:
    """Writes DeepSeek's release format: config.json, safetensors shards and their index. With fp8,
    every projection matrix is stored as e4m3 + weight_scale_inv per block, as DeepSeek ships V3
    (embeddings, heads, norms, the gate and its bias stay in their own dtype)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = net.config.replace(fp8_block_size=net.config.fp8_block_size or WEIGHT_BLOCK) if fp8 else net.config
    shards: list[dict[str, np.ndarray]] = [{}]
    for name, arr in hf_tensors(net):
        if fp8 and _is_fp8_weight(name, arr):
            q, scale_inv = quantize_blocks(arr, cfg.fp8_block_size)
            pieces = {name: q, name + "_scale_inv": scale_inv}
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

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.files:
            raise CheckpointError(f"{self.files.path}: tensor '{name}' is missing (expected shape {list(shape)})")
        file, dtype, got = self.files.info(name)
        if got != shape:
            raise CheckpointError(f"{file}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")
        if dtype == "F8_E4M3":
            scale = name + "_scale_inv"
            block = self.cfg.fp8_block_size or (128, 128)
            if scale not in self.files:
                raise CheckpointError(f"{file}: FP8 tensor '{name}' has no '{scale}' beside it")
            sfile, sdtype, sshape = self.files.info(scale)
            if sshape != scale_shape(shape, block) or sdtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{sfile}: tensor '{scale}' is {sdtype}{list(sshape)}, expected a float tensor "
                                      f"of shape {list(scale_shape(shape, block))} (blocks of {list(block)})")
        elif dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has dtype {dtype}, expected a floating-point tensor "
                                  f"({', '.join(FLOAT_DTYPES)} or F8_E4M3 with weight_scale_inv)")

    def read(self, name: str, dtype, index: tuple[slice, ...]) -> np.ndarray:
        raw = self.files.raw(name)
        if raw.dtype == FP8:
            scale = self.files.raw(name + "_scale_inv")
            raw = dequantize_blocks(raw, scale, self.cfg.fp8_block_size or (128, 128), np.float32)
        return np.asarray(raw[index], dtype=dtype)


def _load_leaf(reader: _TensorReader, cfg, placement, path, abstract, sharding) -> jax.Array:
    if path[-1] in placement:  # expert maps are not in the checkpoint: every layer starts at the default
        return jax.device_put(np.broadcast_to(placement[path[-1]], abstract.shape).astype(abstract.dtype), sharding)
    n_stacked = stacked_dims(path)
    stack_shape, tensor_shape = abstract.shape[:n_stacked], tuple(abstract.shape[n_stacked:])

    def name(stack_index):  # a physical expert slot reads its logical expert's tensor
        if "experts" in path:
            stack_index = (stack_index[0], int(placement["phy2log"][stack_index[1]]))
        return tensor_name(cfg, path, stack_index)

    for index in np.ndindex(*stack_shape):
        reader.check(name(index), tensor_shape)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        ranges = [range(*s.indices(n)) for s, n in zip(index[:n_stacked], stack_shape)]
        out = np.empty([len(r) for r in ranges] + [len(range(*s.indices(n))) for s, n in
                                                    zip(index[n_stacked:], tensor_shape)], abstract.dtype)
        for pos in np.ndindex(*out.shape[:n_stacked]):
            out[pos] = reader.read(name(tuple(r[i] for r, i in zip(ranges, pos))), abstract.dtype, index[n_stacked:])
        return out

    return jax.make_array_from_callback(abstract.shape, sharding, shard, dtype=abstract.dtype)


def _abstract(cfg: ModelConfig, dtype, n_physical):
    return nnx.split(nnx.eval_shape(lambda: DeepseekV3(cfg, dtype, nnx.Rngs(0), n_physical)))


def _shardings(abstract_state, mesh):
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, nnx.to_pure_dict(abstract_state))
    from sharding.mesh import param_shardings  # the rule table lives with the mesh
    return nnx.to_pure_dict(param_shardings(abstract_state, mesh))


def load(path, dtype=jnp.float32, mesh=None, deployment=None) -> DeepseekV3:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    cfg = ModelConfig.from_json(path / "config.json")
    ep, n_physical = None, None
    if mesh is not None or deployment is not None:
        from sharding.deployment import resolve
        deployment, mesh = resolve(deployment, mesh)
        kernels = deployment.kernels_for(mesh)
        ep = deployment.ep_config(mesh, kernels)
        n_physical = deployment.n_physical_experts(cfg.n_routed_experts) if cfg.n_routed_experts else None
    if (path / ORBAX_DIR).is_dir():
        net = _load_orbax(path, cfg, dtype, mesh, n_physical)
    else:
        net = _load_hf(path, cfg, dtype, mesh, n_physical)
    net.set_expert_parallel(ep)
    if deployment is not None:
        net.set_kernels(kernels)
    return net


def _load_hf(path: Path, cfg: ModelConfig, dtype, mesh, n_physical) -> DeepseekV3:
    files = SafetensorsDir(path)
    if cfg.n_mtp_layers and not any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in files.entries):
        # transformers' save_pretrained drops DeepSeek's MTP layer; serve without it.
        log.warning("%s: config has %d MTP layer(s) but the checkpoint holds none; loading without MTP",
                    path, cfg.n_mtp_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    graphdef, abstract = _abstract(cfg, dtype, n_physical)
    reader = _TensorReader(files, cfg)
    placement = default_placement(cfg.n_routed_experts, n_physical or cfg.n_routed_experts) if cfg.n_moe_layers else {}
    shardings = _shardings(abstract, mesh)
    state = jax.tree_util.tree_map_with_path(
        lambda kp, a, s: _load_leaf(reader, cfg, placement, _key_path(kp), a, s), nnx.to_pure_dict(abstract),
        shardings)
    nnx.replace_by_pure_dict(abstract, state)
    return nnx.merge(graphdef, abstract)


# ---- Orbax ---------------------------------------------------------------------------------------

def save_orbax(net: DeepseekV3, path) -> None:
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(net.config.to_dict(), indent=2))
    (path / LAYOUT_FILE).write_text(json.dumps({"n_physical_experts": net.n_physical_experts}))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / ORBAX_DIR, nnx.to_pure_dict(nnx.state(net)), force=True)
        ckptr.wait_until_finished()


def _load_orbax(path: Path, cfg: ModelConfig, dtype, mesh, n_physical) -> DeepseekV3:
    """Restores the exact state saved, physical expert slots and their placement included."""
    import orbax.checkpoint as ocp
    saved = json.loads((path / LAYOUT_FILE).read_text())["n_physical_experts"] or None
    if n_physical is not None and saved != n_physical:
        raise CheckpointError(f"{path}: saved with {saved} physical experts per layer, but the deployment asks "
                              f"for {n_physical}; load it without a deployment, or re-export it with save_safetensors")
    graphdef, abstract = _abstract(cfg, dtype, saved)
    shardings = _shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path.absolute() / ORBAX_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path / ORBAX_DIR}: cannot restore onto {path / 'config.json'}'s model ({e})") from None
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


__all__ = ["CheckpointError", "ConfigError", "SafetensorsDir", "hf_tensors", "load", "save_orbax",
           "save_safetensors", "tensor_name", "write_safetensors"]
