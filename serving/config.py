"""ServingConfig: the `serving` section of a deployment file (buckets, KV-cache budget, limits)."""

from __future__ import annotations

import dataclasses
import math

from serving.balance import POLICIES

KV_DTYPES = ("auto", "bf16", "fp32")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    block_size: int = 16  # tokens per KV block: the prefix-cache granularity
    kv_cache_mb: float = 64.0  # per dp rank; the pool holds as many blocks as fit
    kv_dtype: str = "auto"  # auto = the model's dtype
    max_model_len: int | None = None  # default: min(the model's max positions, 2048)
    # Shape buckets, each compiled once: prefill chunk lengths (the largest is the chunk size for
    # long prompts), prefill rows per rank, decode rows per rank.
    prefill_tokens: tuple[int, ...] = (16, 64, 256)
    prefill_rows: tuple[int, ...] = (1, 4)
    decode_batch: tuple[int, ...] = (1, 4, 16, 64)
    placement: str = "balanced"  # requests on dp ranks: balanced (serving/balance.py) | round_robin
    # decode attention: auto (the Pallas paged MLA kernel on GPU, XLA elsewhere) | xla | pallas |
    # interpret (the kernel run by the Pallas interpreter: tests of the GPU path on CPU)
    attention_kernel: str = "auto"
    # Disk tier of the prefix cache (serving/kv_disk.py): one checksummed file per full block.
    disk_cache_dir: str | None = None
    disk_cache_mb: float = 1024.0

    def __post_init__(self):
        for name in ("prefill_tokens", "prefill_rows", "decode_batch"):
            value = tuple(getattr(self, name))
            if not value or any(not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"serving.{name} must be a non-empty list of positive integers, got {value}")
            object.__setattr__(self, name, tuple(sorted(value)))
        if self.block_size < 1 or self.kv_cache_mb <= 0:
            raise ValueError(f"serving.block_size={self.block_size} and kv_cache_mb={self.kv_cache_mb} must be > 0")
        if self.placement not in POLICIES:
            raise ValueError(f"serving.placement {self.placement!r} is not one of {POLICIES}")
        if self.attention_kernel not in ("auto", "xla", "pallas", "interpret"):
            raise ValueError(f"serving.attention_kernel {self.attention_kernel!r} is not one of "
                             f"auto, xla, pallas, interpret")
        if self.disk_cache_mb <= 0:
            raise ValueError(f"serving.disk_cache_mb={self.disk_cache_mb} must be > 0")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"serving.kv_dtype {self.kv_dtype!r} is not one of {KV_DTYPES}")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<deployment>") -> "ServingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{source}: unknown serving field(s) {sorted(unknown)} (known: {sorted(known)})")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def context_len(self, model_max: int) -> int:
        return self.max_model_len or min(model_max, 2048)

    def blocks_per_rank(self, layers: int, width: int, itemsize: int) -> int:
        per_block = layers * self.block_size * width * itemsize
        return max(1, math.floor(self.kv_cache_mb * 2 ** 20 / per_block))


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket holding n (sizes sorted); n must not exceed the largest."""
    for s in sizes:
        if n <= s:
            return s
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
