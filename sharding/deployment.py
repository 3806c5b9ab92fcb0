"""Deployment files (configs/deploy/*.json), parsed once into one frozen tree, `Deployment`:

    {"name": "cpu8",
     "platform": "auto",
     "quantization": "fp8",
     "mesh": {"dp": 8, "tp": 1, "gpus_per_node": 8},
     "experts": {"redundant": 8, "rebalance_interval": 0, "rebalance_window": 4, "rebalance_threshold": 1.1},
     "dispatch": {"dtype": "auto", "combine_dtype": "auto", "capacity_factors": [2.0, 4.0, null],
                  "capacity_window": 8, "overlap": "none"},
     "kernels": {"attention_decode": "auto", "attention_prefill": "auto", "gemm": "auto", "transport": "auto"},
     "compiler_options": {},
     "serving": {"block_size": 16, "kv_cache_mb": 64, "prefill_tokens": [16, 64, 256], ...},
     "speculative": {"method": "mtp", "num_tokens": 1}}

platform: "auto" (default: the platform of the devices the mesh is built on) | "gpu" | "cpu" |
"tpu": decided once, at load, and passed down as configuration (the kernels' "auto" resolves for it,
model/kernels/registry.py; so does quantization's default). compiler_options: XLA options for the
step's jit on top of the platform's defaults (COMPILER_OPTIONS: on GPU the latency-hiding scheduler,
and GEMMs that read one layer's slice of a stacked weight in place).

quantization: "fp8" | "none"; left out, the default rule (fp8 on a GPU for an FP8 checkpoint, none
otherwise; a `quantization` argument or flag overrides the file). dispatch.dtype "auto" (default)
sends what the expert GEMMs consume: FP8 rows + scales for FP8 experts, the activations' own dtype
otherwise; "fp8" before non-FP8 experts quantises for the wire alone, which loses accuracy (an
explicit choice: half the bytes of BF16). combine_dtype "auto" (default) returns the activations'
dtype; "bf16" is DeepSeek's (their activations are BF16).

Every section but `name` is optional. EP spans every device of the mesh (dp x tp); routed experts
+ redundant replicas must divide evenly over it (DeepSeek: 256 + 32 = 288 = 32 x 9 for prefill,
144 x 2 for decode). The model loader and the serving engine read this one object; the run-time
EPConfig is derived from it on a mesh (`ep_config`, with the kernels resolved for its platform).

A disaggregated deployment is two such deployments, {"prefill": {...}, "decode": {...}}: the
prefill slice takes the first devices, the decode slice the next (configs/deploy/cpu8-disagg.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax

from sharding.ep import EPConfig
from sharding.kernels import Kernels
from sharding.mesh import make_mesh

# file section -> {key in the file: (Deployment field, type)}; kernels, serving and speculative are
# sections of their own dataclasses
FLAT_SECTIONS = {
    "mesh": {"dp": ("dp", int), "tp": ("tp", int), "gpus_per_node": ("gpus_per_node", int)},
    "experts": {"redundant": ("redundant_experts", int), "rebalance_interval": ("rebalance_interval", int),
                "rebalance_window": ("rebalance_window", int), "rebalance_threshold": ("rebalance_threshold", float)},
    "dispatch": {"dtype": ("dispatch_dtype", str), "combine_dtype": ("combine_dtype", str),
                 "capacity_factors": ("capacity_factors", tuple), "capacity_window": ("capacity_window", int),
                 "overlap": ("overlap", str)},
}
SECTIONS = ("name", "description", "platform", "quantization", "compiler_options", *FLAT_SECTIONS, "kernels", "serving",
            "speculative")
PLATFORMS = ("auto", "gpu", "cpu", "tpu")
# XLA options of every step on a platform (docs/DESIGN_NOTES.md, "GPU"): collectives overlap compute only
# under the latency-hiding scheduler; a GEMM on one layer's slice of a stacked weight reads the slice in
# place (a dynamic-slice fusion) when the GEMM is a custom call or cuBLAS, while a Triton GEMM fusion
# copies the slice first, so XLA's GEMMs go to cuBLAS.
COMPILER_OPTIONS = {"gpu": {"xla_gpu_enable_latency_hiding_scheduler": True,
                            "xla_gpu_enable_dynamic_slice_fusion": True,
                            "xla_gpu_enable_triton_gemm": False}}
PLACEMENTS = ("balanced", "round_robin")  # serving/balance.py
KV_DTYPES = ("auto", "bf16", "fp32")
QUANTIZATIONS = ("fp8", "none")  # model/quant.py: FP8 e4m3 weights with 128x128 scales, or none


def check_quantization(quantization) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of 'fp8', 'none' (leave it unset for the "
                         f"default: fp8 on a GPU for an FP8 checkpoint, none otherwise)")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """The `serving` section: shape buckets, KV-cache budget, limits, placement, disk tier."""
    block_size: int = 16  # tokens per KV block: the prefix-cache granularity
    kv_cache_mb: float = 64.0  # per dp rank; the pool holds as many blocks as fit
    kv_dtype: str = "auto"  # auto = the model's dtype
    max_model_len: int | None = None  # default: the model's max_position_embeddings (a larger one is refused)
    # Shape buckets, each compiled once: prefill chunk lengths (the largest is the chunk size for
    # long prompts), prefill rows per rank, decode rows per rank.
    prefill_tokens: tuple[int, ...] = (16, 64, 256)
    prefill_rows: tuple[int, ...] = (1, 4)
    decode_batch: tuple[int, ...] = (1, 4, 16, 64)
    # Tokens per dp rank and step (vLLM's name): every running decode's rows first, the rest prefill
    # chunks. Default: the largest prefill batch the buckets compile (prefill_rows x prefill_tokens).
    max_num_batched_tokens: int | None = None
    placement: str = "balanced"  # requests on dp ranks: balanced (serving/balance.py) | round_robin
    # Disk tier of the prefix cache (serving/kv_disk.py): one checksummed file per full block.
    disk_cache_dir: str | None = None
    disk_cache_mb: float = 1024.0
    # Async scheduling (vLLM's --async-scheduling): step N + 1 is scheduled and dispatched while step
    # N runs; false: each step is read before the next is scheduled (serving/engine.py).
    async_scheduling: bool = True

    def __post_init__(self):
        for name in ("prefill_tokens", "prefill_rows", "decode_batch"):
            value = tuple(getattr(self, name))
            if not value or any(not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"serving.{name} must be a non-empty list of positive integers, got {value}")
            object.__setattr__(self, name, tuple(sorted(value)))
        if self.block_size < 1 or self.kv_cache_mb <= 0:
            raise ValueError(f"serving.block_size={self.block_size} and kv_cache_mb={self.kv_cache_mb} must be > 0")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"serving.placement {self.placement!r} is not one of {PLACEMENTS}")
        if self.disk_cache_mb <= 0:
            raise ValueError(f"serving.disk_cache_mb={self.disk_cache_mb} must be > 0")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"serving.async_scheduling must be true or false, got {self.async_scheduling!r}")
        if self.max_num_batched_tokens is not None and (not isinstance(self.max_num_batched_tokens, int)
                                                        or self.max_num_batched_tokens < 1):
            raise ValueError(f"serving.max_num_batched_tokens must be a positive integer, got "
                             f"{self.max_num_batched_tokens!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"serving.max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"serving.kv_dtype {self.kv_dtype!r} is not one of {KV_DTYPES}")

    def context_len(self, model_max: int) -> int:
        """The context served: max_model_len, by default the model's own (as vLLM and SGLang)."""
        if self.max_model_len is not None and self.max_model_len > model_max:
            raise ValueError(f"serving.max_model_len {self.max_model_len} is more than the model's context of "
                             f"{model_max} tokens (max_position_embeddings); lower it or leave it out")
        return self.max_model_len or model_max

    def token_budget(self) -> int:
        """Tokens per dp rank and step (max_num_batched_tokens, or the largest prefill batch)."""
        return self.max_num_batched_tokens or self.prefill_rows[-1] * self.prefill_tokens[-1]

    def blocks_per_rank(self, layers: int, width: int, itemsize: int) -> int:
        per_block = layers * self.block_size * width * itemsize
        return max(1, math.floor(self.kv_cache_mb * 2 ** 20 / per_block))


@dataclasses.dataclass(frozen=True)
class Speculative:
    """The `speculative` section: draft tokens per step proposed by the checkpoint's MTP module."""
    method: str = "mtp"
    num_tokens: int = 1

    def __post_init__(self):
        if self.method != "mtp":
            raise ValueError(f"speculative.method {self.method!r} is not one of ('mtp',)")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"speculative.num_tokens must be a positive integer, got {self.num_tokens!r}")


def _section(cls, raw, source: str, section: str):
    """A section's dict -> its frozen dataclass; unknown fields and bad values fail in one sentence."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: section '{section}' must be an object, got {raw!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{source}: unknown {section} field(s) {sorted(unknown)} (known: {sorted(known)})")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Deployment:
    name: str
    # mesh
    dp: int
    tp: int = 1
    gpus_per_node: int = 8  # EPLB's hierarchical policy packs expert groups onto nodes
    # experts
    redundant_experts: int = 0
    # Live EPLB: every `rebalance_interval` engine steps (0: never) look at the loads of the last
    # `rebalance_window` intervals; re-place the experts if max/mean GPU load exceeds the threshold.
    rebalance_interval: int = 0
    rebalance_window: int = 4
    rebalance_threshold: float = 1.1
    # dispatch (sharding/ep.py)
    dispatch_dtype: str = "auto"
    combine_dtype: str = "auto"
    capacity_factors: tuple[float | None, ...] = (2.0, 4.0, None)
    # After an overflow raised the EP capacity level, this many steps in a row without one bring it
    # back down a level: one skewed batch must not make every later step pay for a larger bucket.
    # An overflow soon after a step down doubles the window (serving/runner.py CapacityWindow).
    capacity_window: int = 8
    overlap: str = "none"  # none | auto (two_batch prefill, five_stage decode) | two_batch | five_stage
    kernels: Kernels = Kernels()  # (a dict is taken as the file's section)
    serving: ServingConfig = ServingConfig()  # (a dict is taken as the file's section)
    # "auto": MTP drafts 1 token where the checkpoint has MTP weights; None (the file's null): off
    speculative: Speculative | str | None = "auto"  # (a dict is taken as the file's section)
    quantization: str | None = None  # fp8 | none | None (the default rule, model.quant.default_quantization)
    platform: str = "auto"  # auto (the mesh's devices') | gpu | cpu | tpu
    compiler_options: tuple[tuple[str, object], ...] = ()  # (option, value) pairs over the platform's defaults
    source: str = "<deployment>"  # the file, for error messages
    _ep: EPConfig = dataclasses.field(init=False, repr=False, compare=False)  # the dispatch section, validated

    def __post_init__(self):
        if self.speculative not in ("auto", None) and not isinstance(self.speculative, (dict, Speculative)):
            raise ValueError(f"{self.source}: speculative must be an object like {{\"method\": \"mtp\", "
                             f"\"num_tokens\": 1}}, \"auto\" or null, got {self.speculative!r}")
        for name, cls in (("kernels", Kernels), ("serving", ServingConfig), ("speculative", Speculative)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, _section(cls, getattr(self, name), self.source, name))
        if self.dp < 1 or self.tp < 1 or self.redundant_experts < 0:
            raise ValueError(f"{self.source}: mesh dp={self.dp}, tp={self.tp} must be >= 1 and "
                             f"experts.redundant={self.redundant_experts} >= 0")
        if self.quantization is not None:
            try:
                check_quantization(self.quantization)
            except ValueError as e:
                raise ValueError(f"{self.source}: {e}") from None
        if self.platform not in PLATFORMS:
            raise ValueError(f"{self.source}: platform {self.platform!r} is not one of {', '.join(PLATFORMS)}")
        options = self.compiler_options
        if isinstance(options, dict):
            options = tuple(sorted(options.items()))
        if not all(isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str)
                   and isinstance(kv[1], (bool, int, float, str)) for kv in options):
            raise ValueError(f"{self.source}: compiler_options must map XLA option names to booleans, numbers "
                             f"or strings, got {self.compiler_options!r}")
        object.__setattr__(self, "compiler_options", tuple(options))
        if self.capacity_window < 1:
            raise ValueError(f"{self.source}: dispatch.capacity_window={self.capacity_window} must be >= 1")
        try:
            ep = EPConfig(mesh=None, dispatch_dtype=self.dispatch_dtype, combine_dtype=self.combine_dtype,
                          capacity_factors=tuple(self.capacity_factors), overlap=self.overlap)
        except ValueError as e:
            raise ValueError(f"{self.source}: {e}") from None
        object.__setattr__(self, "_ep", ep)

    @property
    def ep_size(self) -> int:
        return self.dp * self.tp

    @property
    def nodes(self) -> int:
        return self.nodes_for(self.ep_size)

    def nodes_for(self, ranks: int) -> int:
        return max(1, -(-ranks // self.gpus_per_node))

    @classmethod
    def for_devices(cls, n: int, n_routed_experts: int) -> "Deployment":
        """n devices: DP attention over them, EP over them, the fewest redundant experts that make
        the physical experts divide evenly."""
        return cls(name=f"auto-{n}", dp=n, redundant_experts=(-n_routed_experts) % n)

    @classmethod
    def from_json(cls, path) -> "Deployment":
        dep = read(path)
        if not isinstance(dep, Deployment):
            raise ValueError(f"{path}: describes a disaggregated deployment (prefill + decode slices); "
                             f"serve it with serving.LLM or serving.disagg")
        return dep

    @classmethod
    def from_dict(cls, raw: dict, source: str, name: str | None = None) -> "Deployment":
        fields = {}
        for key, value in raw.items():
            if key not in SECTIONS:
                raise ValueError(f"{source}: unknown section '{key}' (known: {', '.join(SECTIONS)})")
            allowed = FLAT_SECTIONS.get(key)
            if allowed is None:
                continue
            if not isinstance(value, dict) or set(value) - set(allowed):
                raise ValueError(f"{source}: section '{key}' may hold only {sorted(allowed)}, got {value!r}")
            try:
                fields.update({allowed[k][0]: allowed[k][1](v) for k, v in value.items()})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{source}: section '{key}': {e}") from None
        fields.setdefault("dp", 1)
        sections = {k: raw[k] for k in ("kernels", "serving") if raw.get(k) is not None}
        if "speculative" in raw:  # null turns it off
            sections["speculative"] = raw["speculative"]
        top = {k: raw[k] for k in ("platform", "compiler_options") if k in raw}
        return cls(name=raw.get("name", name), **fields, **sections, **top, quantization=raw.get("quantization"),
                   source=source)

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

    def platform_for(self, mesh=None) -> str:
        """The platform, decided once at load: as given, else that of the mesh's devices (no mesh: of
        the first device present)."""
        if self.platform != "auto":
            return self.platform
        return (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform

    def xla_options(self, platform: str) -> dict:
        """The step's jit compiler_options: the platform's defaults, then the file's."""
        return {**COMPILER_OPTIONS.get(platform, {}), **dict(self.compiler_options)}

    def ep_config(self, mesh, kernels: Kernels) -> EPConfig | None:
        """The run-time EP configuration on this mesh, with the kernels resolved for its platform
        (model/kernels/registry.py: resolve); None for one device (the MoE layers then run locally,
        without collectives)."""
        if mesh is None or mesh.size == 1:
            return None
        return dataclasses.replace(self._ep, mesh=mesh, transport=kernels.transport)


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
    extra = set(raw) - {"name", "description", "quantization", "platform", "prefill", "decode"}
    if extra or not isinstance(raw.get("prefill"), dict) or not isinstance(raw.get("decode"), dict):
        raise ValueError(f"{path}: a disaggregated deployment holds 'prefill' and 'decode' sections (each a "
                         f"deployment: mesh, experts, dispatch, kernels, serving), and may name a 'quantization' "
                         f"and a 'platform' for both, but nothing else{f', not {sorted(extra)}' if extra else ''}")
    name = raw.get("name", path.stem)
    both = {k: raw[k] for k in ("quantization", "platform") if k in raw}  # a slice may set its own
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


def with_serving(dep, **fields):
    """The deployment (or both slices of a disaggregated one) with these serving fields set; None
    values are left as they are (--max-model-len, --max-num-batched-tokens, LLM's arguments)."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if not fields:
        return dep
    if isinstance(dep, Disaggregated):
        return dataclasses.replace(dep, prefill=with_serving(dep.prefill, **fields),
                                   decode=with_serving(dep.decode, **fields))
    return dataclasses.replace(dep, serving=dataclasses.replace(dep.serving, **fields))
