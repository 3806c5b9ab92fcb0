"""The safetensors format, read as DeepSeek's release needs: each file's header parsed, its data
memory-mapped, so a tensor is read one slice at a time straight into the device shard that needs
it (a 671B checkpoint never sits whole in host memory; numpy's safetensors loader cannot read
F8_E4M3 anyway). Also the writer for our own exports."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from model.quant import FP8

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

