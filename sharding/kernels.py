"""The deployment's `kernels` section: which implementation runs each hot path, by name.

Data only: the names, what "auto" means on each platform and what each name is (the functions, and
the shapes each kernel takes) are model/kernels/registry.py's, the one kernel registry. A deployment
resolves its section there once, for the platform it runs on (Deployment.platform), and the resolved
names travel with the model and the EP configuration, so no call site decides again.
"""

from __future__ import annotations

import dataclasses

ROLES = ("attention_decode", "attention_prefill", "gemm", "transport")


@dataclasses.dataclass(frozen=True)
class Kernels:
    # paged absorbed-MLA decode: xla | triton | flash_mla (| their _interpret: the kernel run by the
    # Mosaic GPU / Pallas interpreter, CPU tests of the GPU path)
    attention_decode: str = "auto"
    # naive-form MLA prefill attention: xla | tokamax | tokamax_cudnn | tokamax_triton | tokamax_xla
    attention_prefill: str = "auto"
    # the FP8 GEMMs (projections, dense MLP, shared and routed experts, the absorbed MLA's per-head
    # products): xla (the references of model/quant.py) | mosaic_fp8 (| mosaic_fp8_interpret) | triton
    # (the first Pallas grouped GEMM: routed experts only, BF16 MMA after in-kernel dequantisation)
    gemm: str = "auto"
    transport: str = "auto"  # all-to-all: padded (all_to_all) | ragged (ragged_all_to_all; XLA:CPU lacks it)
    # the device's streaming multiprocessors (the paged decode kernel splits the KV over them:
    # registry.decode_parts); 0 until resolved
    sms: int = 0

    def __post_init__(self):
        for name in ROLES:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"kernels.{name} must be a kernel name (a string), got {getattr(self, name)!r}")
        if not isinstance(self.sms, int) or self.sms < 0:
            raise ValueError(f"kernels.sms must be a non-negative integer, got {self.sms!r}")

    @property
    def resolved(self) -> bool:
        return all(getattr(self, name) != "auto" for name in ROLES)
