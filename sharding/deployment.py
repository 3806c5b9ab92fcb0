"""Deployment files (configs/deploy/*.json): the mesh, expert parallelism, dispatch precision and
the weights' quantization.

    {"name": "cpu8", "mesh": {"dp": 8, "tp": 1}, "experts": {"redundant": 8}, "quantization": "fp8",
     "dispatch": {"dtype": "auto", "combine_dtype": "auto", "capacity_factors": [2.0, 4.0, null]}}

quantization: "fp8" | "none"; left out, the default rule (fp8 on a GPU for an FP8 checkpoint, none
otherwise; a `quantization` argument or flag overrides the file). dispatch.dtype "auto" (default)
sends what the expert GEMMs consume: FP8 rows + scales for FP8 experts, the activations' own dtype
otherwise; "fp8" before non-FP8 experts quantises for the wire alone, which loses accuracy (an
explicit choice: half the bytes of BF16). combine_dtype "auto" (default) returns the activations'
dtype; "bf16" is DeepSeek's (their activations are BF16).

EP spans every device of the mesh (dp x tp); routed experts + redundant replicas must divide
evenly over it (DeepSeek: 256 + 32 = 288 = 32 x 9 for prefill, 144 x 2 for decode).

A disaggregated deployment is two such deployments, {"prefill": {...}, "decode": {...}}: the
prefill slice takes the first devices, the decode slice the next (configs/deploy/cpu8-disagg.json).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from model.quant import check_quantization
from sharding.ep import EPConfig
from sharding.mesh import make_mesh

SECTIONS = {"name": None, "description": None, "quantization": None, "mesh": {"dp", "tp", "gpus_per_node"},
            "experts": {"redundant", "rebalance_interval", "rebalance_window", "rebalance_threshold"},
            "dispatch": {"dtype", "combine_dtype", "capacity_factors", "overlap"},
            "serving": None}  # read by serving.config.ServingConfig


@dataclasses.dataclass(frozen=True)
class Deployment:
    name: str
    dp: int
    tp: int = 1
    redundant_experts: int = 0
    dispatch_dtype: str = "auto"
    combine_dtype: str = "auto"
    capacity_factors: tuple[float | None, ...] = (2.0, 4.0, None)
    overlap: str = "none"  # none | auto (two_batch prefill, five_stage decode) | two_batch | five_stage
    gpus_per_node: int = 8  # EPLB's hierarchical policy packs expert groups onto nodes
    # Live EPLB: every `rebalance_interval` engine steps (0: never) look at the loads of the last
    # `rebalance_window` intervals; re-place the experts if max/mean GPU load exceeds the threshold.
    rebalance_interval: int = 0
    rebalance_window: int = 4
    rebalance_threshold: float = 1.1
    quantization: str | None = None  # fp8 | none | None (the default rule, model.quant.default_quantization)
    serving: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
    source: str = "<deployment>"  # the file, for error messages

    def __post_init__(self):
        if self.dp < 1 or self.tp < 1 or self.redundant_experts < 0:
            raise ValueError(f"{self.source}: mesh dp={self.dp}, tp={self.tp} must be >= 1 and "
                             f"experts.redundant={self.redundant_experts} >= 0")
        if self.quantization is not None:
            check_quantization(self.quantization)

    @property
    def ep_size(self) -> int:
        return self.dp * self.tp

    @property
    def nodes(self) -> int:
        return max(1, -(-self.ep_size // self.gpus_per_node))

    @classmethod
    def from_json(cls, path) -> "Deployment":
        dep = read(path)
        if not isinstance(dep, Deployment):
            raise ValueError(f"{path}: describes a disaggregated deployment (prefill + decode slices); "
                             f"serve it with serving.LLM or serving.disagg")
        return dep

    @classmethod
    def from_dict(cls, raw: dict, source: str, name: str | None = None) -> "Deployment":
        for key, value in raw.items():
            if key not in SECTIONS:
                raise ValueError(f"{source}: unknown section '{key}' (known: {', '.join(SECTIONS)})")
            allowed = SECTIONS[key]
            if allowed is not None and (not isinstance(value, dict) or set(value) - allowed):
                raise ValueError(f"{source}: section '{key}' may hold only {sorted(allowed)}, got {value!r}")
        mesh, experts, dispatch = raw.get("mesh", {}), raw.get("experts", {}), raw.get("dispatch", {})
        factors = dispatch.get("capacity_factors", [2.0, 4.0, None])
        try:
            dep = cls(name=raw.get("name", name), dp=int(mesh.get("dp", 1)), tp=int(mesh.get("tp", 1)),
                      redundant_experts=int(experts.get("redundant", 0)),
                      dispatch_dtype=dispatch.get("dtype", "auto"),
                      combine_dtype=dispatch.get("combine_dtype", "auto"), quantization=raw.get("quantization"),
                      capacity_factors=tuple(factors), overlap=dispatch.get("overlap", "none"),
                      gpus_per_node=int(mesh.get("gpus_per_node", 8)),
                      rebalance_interval=int(experts.get("rebalance_interval", 0)),
                      rebalance_window=int(experts.get("rebalance_window", 4)),
                      rebalance_threshold=float(experts.get("rebalance_threshold", 1.1)),
                      serving=raw.get("serving", {}), source=source)
            EPConfig(mesh=None, dispatch_dtype=dep.dispatch_dtype, combine_dtype=dep.combine_dtype,
                     capacity_factors=dep.capacity_factors, overlap=dep.overlap)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        return dep

    def n_physical_experts(self, n_routed_experts: int) -> int:
        """Routed experts + redundant replicas, checked to divide over the EP group."""
        physical = n_routed_experts + self.redundant_experts
        if physical % self.ep_size:
            raise ValueError(f"{self.source}: {physical} physical experts ({n_routed_experts} routed + "
                             f"{self.redundant_experts} redundant) do not divide over EP{self.ep_size} "
                             f"(dp={self.dp} x tp={self.tp})")
        return physical

    def make_mesh(self, devices=None):
        return make_mesh(self.dp, self.tp, devices)

    def ep_config(self, mesh) -> EPConfig | None:
        """None for a one-device deployment: the MoE layers then run locally, without collectives."""
        if self.ep_size == 1:
            return None
        return EPConfig(mesh=mesh, dispatch_dtype=self.dispatch_dtype, combine_dtype=self.combine_dtype,
                        capacity_factors=self.capacity_factors, overlap=self.overlap)


@dataclasses.dataclass(frozen=True)
class Disaggregated:
    """Prefill and decode on separate slices of the devices (prefill first), each a whole deployment
    of its own: mesh, EP size, redundant experts, dispatch, buckets (serving/disagg.py)."""
    name: str
    prefill: Deployment
    decode: Deployment
    source: str = "<deployment>"

    @property
    def devices(self) -> int:
        return self.prefill.ep_size + self.decode.ep_size


def read(path) -> "Deployment | Disaggregated":
    """A deployment file: one mesh for everything, or {"prefill": {...}, "decode": {...}} slices."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: deployment file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    if "prefill" not in raw and "decode" not in raw:
        return Deployment.from_dict(raw, str(path), path.stem)
    extra = set(raw) - {"name", "description", "quantization", "prefill", "decode"}
    if extra or not isinstance(raw.get("prefill"), dict) or not isinstance(raw.get("decode"), dict):
        raise ValueError(f"{path}: a disaggregated deployment holds 'prefill' and 'decode' sections (each a "
                         f"deployment: mesh, experts, dispatch, serving), and may name a 'quantization' for "
                         f"both, but nothing else{f', not {sorted(extra)}' if extra else ''}")
    name = raw.get("name", path.stem)
    both = {"quantization": raw["quantization"]} if "quantization" in raw else {}  # a slice may set its own
    return Disaggregated(name, Deployment.from_dict({**both, **raw["prefill"]}, f"{path} [prefill]", f"{name}-prefill"),
                         Deployment.from_dict({**both, **raw["decode"]}, f"{path} [decode]", f"{name}-decode"), str(path))


def resolve(deployment, mesh=None) -> tuple[Deployment, object]:
    """A Deployment (or its file) and the mesh it runs on; a bare mesh gets production defaults."""
    if deployment is None:
        deployment = Deployment(name="mesh", dp=mesh.shape["dp"], tp=mesh.shape["tp"])
    elif not isinstance(deployment, Deployment):
        deployment = Deployment.from_json(deployment)
    if mesh is None:
        mesh = deployment.make_mesh()
    elif (mesh.shape["dp"], mesh.shape["tp"]) != (deployment.dp, deployment.tp):
        raise ValueError(f"{deployment.source}: names mesh dp={deployment.dp} x tp={deployment.tp}, "
                         f"but the mesh given is {dict(mesh.shape)}")
    return deployment, mesh
