"""Which implementation runs each hot path: the deployment's `kernels` section, chosen once.

The kernels themselves (Pallas, with their XLA references) are in model/kernels/; this is data, so
the deployment tree (sharding/deployment.py) and the model read it without reaching into them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax


def on_gpu(platform: str | None = None) -> bool:
    return (platform or jax.default_backend()) == "gpu"


def default_impl(platform: str | None = None) -> str:
    """The one platform rule behind every "auto": the Pallas kernel on GPU, its XLA reference elsewhere."""
    return "pallas" if on_gpu(platform) else "xla"


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The deployment's `kernels` section. "auto" is resolved once (`resolve`), by the platform the
    deployment runs on; the resolved choices travel with the model (attention) and the EP config
    (expert GEMM, transport), so no call site decides again."""
    # decode attention: xla (gather the rows, einsums) | pallas (model/kernels/mla_decode.py over the
    # paged pool in place) | interpret (that kernel in the Pallas interpreter: CPU tests of the GPU path)
    attention_decode: str = "auto"
    attention_prefill: str = "auto"  # xla (naive MLA; the only implementation so far)
    # routed-expert GEMMs (model/experts.py): xla (XLA's GEMMs: masked capacity buckets under EP, tiles
    # on one device; XLA:CPU computes ragged_dot densely, docs/DESIGN_NOTES.md) | pallas (the grouped
    # GEMM kernel over rows sorted by expert, model/kernels/grouped_gemm.py) | interpret (that kernel
    # in the Pallas interpreter: CPU tests of the GPU path)
    expert_gemm: str = "auto"
    transport: str = "auto"  # all-to-all: padded (all_to_all) | ragged (ragged_all_to_all; XLA:CPU lacks it)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention_decode": ("auto", "xla", "pallas", "interpret"), "attention_prefill": ("auto", "xla"),
        "expert_gemm": ("auto", "xla", "pallas", "interpret"), "transport": ("auto", "padded", "ragged")}

    def __post_init__(self):
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"kernels.{name} {getattr(self, name)!r} is not one of {', '.join(choices)}")

    def resolve(self, platform: str | None = None) -> "Kernels":
        """Every "auto" replaced by the platform's choice (platform: a device's, default JAX's backend)."""
        gpu = on_gpu(platform)
        auto = {"attention_decode": default_impl(platform), "attention_prefill": "xla",
                "expert_gemm": default_impl(platform), "transport": "ragged" if gpu else "padded"}
        return Kernels(**{k: auto[k] if getattr(self, k) == "auto" else getattr(self, k) for k in auto})
