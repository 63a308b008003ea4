"""Generation in reduced precision: which one a machine gets, and the model's copy that runs in it.

Stage 5's `--dtype` (the request's `dtype`) is `auto`, `float32`, `bfloat16` or `int8`.
`choose_precision` turns it into the precision generation runs in:

- `float32`: the model's own weights, exactly the path of every release before this choice existed.
- `bfloat16`: the weights (and on a GPU the KV cache) in bf16. On a CPU the projections run as
  oneDNN matrix products on weights packed once (`PackedBf16Linear`); the KV cache and attention
  stay float32 there, because the CPU's bf16 attention for one query row was 4-9x slower than its
  float32 one (BENCHMARKS.md, "Reduced precision on a CPU").
- `int8`: a CPU only. Every projection (GPT-2's fused QKV, its MLP, the input projection and the
  heads) multiplies by int8 weights, one scale per output channel, and quantises each input row on
  the fly (dynamic quantisation, `DynamicInt8Linear`); embeddings, layer norms, attention and the
  KV cache stay float32.

`auto` on a CPU (`auto_cpu_precision`): bf16 on a CPU with AMX-BF16 tiles (the expected winner
there, not measured: no such machine was at hand); else int8, which was measured faster than both
bf16 and float32 on an AMD EPYC with AVX-512 BF16 and no AMX (a `small` step 1.7x float32's, bf16
1.3x; `base` 2.3x and 1.2x) for held-out NLLs within 0.001 bits/frame of float32's; float32 where
this torch has no int8 kernels. On a GPU `auto` is float32 (reduced precision not measured there).
Whatever the precision, the logits are sampled in float32 (the generator casts them) and decoding
stays float32.

`precision_model(model, precision)` is the model generation then runs: the model itself for
float32, else a copy in that precision, made once per model and weight version and kept while the
model lives (the studio's preloaded models reuse it). The copy answers the same calls (`embed`,
`logits`, the backbone's blocks, the full forward), so every engine runs on it unchanged.
"""
from __future__ import annotations

import copy
import functools
import logging
import platform
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG = logging.getLogger("pipeline.precision")
PRECISIONS = ("float32", "bfloat16", "int8")
DTYPES = ("auto", *PRECISIONS)  # what a request may ask for
AMX_FLAG = "amx_bf16"  # /proc/cpuinfo's flag of a CPU with AMX-BF16 tiles
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision generation runs in, what was asked, and why (for the log and the sidecar)."""

    requested: str  # one of DTYPES
    used: str  # one of PRECISIONS
    reason: str
    device: str

    def describe(self) -> dict:
        """The sidecar's `precision`."""
        return {"requested": self.requested, "used": self.used, "kv_cache": kv_cache_precision(self.used, self.device),
                "reason": self.reason}


# ==== the choice ==============================================================================
def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset:
    """The CPU's feature flags: /proc/cpuinfo's `flags` line, else what torch detects (`torch.cpu.get_capabilities`)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return frozenset()
    return frozenset(name for name, present in capabilities().items() if present is True)


def choose_precision(requested: str, device: str, flags: frozenset | None = None) -> PrecisionChoice:
    """`requested` (one of DTYPES) on `device` -> the precision generation runs in.

    `flags`: the CPU's feature flags (None: this machine's, `cpu_flags`). Raises ValueError for a
    precision the device cannot run (int8 on a GPU)."""
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
    on_cpu = device == "cpu"
    if requested == "int8" and not on_cpu:
        raise ValueError("int8 weights run on a CPU only (dynamic quantisation): use --dtype bfloat16 on a GPU")
    if requested == "int8" and not int8_available():
        raise ValueError(f"this torch ({torch.__version__}) has no dynamic int8 kernels: use --dtype float32")
    if requested != "auto":
        return PrecisionChoice(requested, requested, "asked for", device)
    if not on_cpu:
        return PrecisionChoice(requested, "float32", "auto on a GPU: float32 (reduced precision not measured there)",
                               device)
    used, reason = auto_cpu_precision(cpu_flags() if flags is None else flags, int8_available())
    return PrecisionChoice(requested, used, reason, device)


def auto_cpu_precision(flags: frozenset, has_int8: bool) -> tuple[str, str]:
    """`auto` on a CPU with these feature flags -> (precision, why); see the module's docstring."""
    if AMX_FLAG in flags:
        return "bfloat16", "auto on a CPU with AMX-BF16"
    bf16 = "AVX-512 BF16 but no AMX" if "avx512_bf16" in flags else "no bf16 instructions"
    if has_int8:
        return "int8", f"auto on a CPU with {bf16}: int8 measured fastest"
    return "float32", f"auto on a CPU with {bf16}, and this torch has no dynamic int8 kernels"


def kv_cache_precision(precision: str, device: str) -> str:
    """The KV cache's precision: float32 on a CPU (its bf16 attention was slower), else the weights'."""
    if precision == "int8" or device == "cpu":
        return "float32"
    return precision


# ==== projections in reduced precision ==========================================================
class ReducedLinear(nn.Module):
    """A projection `[..., in] -> [..., out]` in reduced precision, called like the `nn.Linear` or
    GPT-2 `Conv1D` it replaces. Its weights are plain attributes, not parameters: `.to()` and
    `state_dict()` leave them alone."""

    in_features: int
    out_features: int


class PackedBf16Linear(ReducedLinear):
    """bf16 weights packed once for oneDNN (`torch.ops.mkldnn`); bf16 rows in, bf16 rows out.

    Where oneDNN has no bf16 path, a plain bf16 `F.linear` on an `[out, in]` copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape  # weight float [out, in]
        self.weight_bf16 = weight.detach().to(torch.bfloat16).contiguous()  # [out, in]
        self.bias_bf16 = None if bias is None else bias.detach().to(torch.bfloat16)  # [out]
        self.packed = None
        if weight.device.type == "cpu" and onednn_bf16_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight_bf16, 1)  # opaque [out, in]
            self.weight_bf16 = None  # the packed copy is the only one kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.to(torch.bfloat16).reshape(-1, self.in_features)  # [..., in] -> [N, in]
        if self.packed is None:
            out = F.linear(rows, self.weight_bf16, self.bias_bf16)  # [N, out]
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias_bf16, "none", [], "")  # [N, out]
        return out.view(*x.shape[:-1], self.out_features)  # [N, out] -> [..., out]


class DynamicInt8Linear(ReducedLinear):
    """int8 weights (one scale per output channel) prepacked for the CPU's quantised engine; each
    call quantises its float32 rows (one scale per call) and returns float32 rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape  # weight float [out, in]
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()  # [out]
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        bias = None if bias is None else bias.detach().float()
        with warnings.catch_warnings():  # torch 2.13 marks quantised tensors as deprecated; they still work
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)  # [out, in]
            self.packed = torch.ops.quantized.linear_prepack(quantized, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.float().reshape(-1, self.in_features)  # [..., in] -> [N, in]
        out = torch.ops.quantized.linear_dynamic(rows, self.packed, int8_reduce_range())
        return out.view(*x.shape[:-1], self.out_features)  # [N, out] -> [..., out]


def traceable(model: nn.Module) -> bool:
    """Whether TorchScript can trace a step of `model`: not with oneDNN's packed bf16 weights (opaque
    tensors a trace cannot hold; such a bf16 copy steps eagerly, as before the trace existed)."""
    return not any(isinstance(module, PackedBf16Linear) and module.packed is not None for module in model.modules())


@functools.lru_cache(maxsize=1)
def int8_reduce_range() -> bool:
    """Quantise activations to 7 bits instead of 8 on x86 CPUs without VNNI, whose int8 products sum
    pairs into 16 bits and could saturate (torch's own advice); with VNNI, 8 bits are safe."""
    if not cpu_flags() & {"avx512_vnni", "avx_vnni"}:
        return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    return False


def onednn_bf16_available() -> bool:
    """Whether oneDNN runs bf16 matrix products on this CPU (torch's own check)."""
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(checker()) if checker is not None else False
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=1)
def int8_available() -> bool:
    """Whether this torch still has the dynamic-quantisation kernels (deprecated, not yet removed)."""
    try:
        DynamicInt8Linear(torch.ones(2, 2), None)(torch.ones(1, 2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


# ==== the model in a precision ==================================================================
KERNELS = {"bfloat16": PackedBf16Linear, "int8": DynamicInt8Linear}
_copies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {precision: (version, copy)}


def weight_version(model: nn.Module) -> int:
    """Changes whenever a parameter is written in place (an optimizer step, `load_state_dict`)."""
    return sum(parameter._version for parameter in model.parameters())


def precision_model(model: nn.Module, precision: str) -> nn.Module:
    """The model generation runs for `precision`: `model` itself for float32, else its copy in that
    precision (made once per weight version, kept while `model` lives)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return model
    copies = _copies.setdefault(model, {})
    version = weight_version(model)
    cached = copies.get(precision)
    if cached is None or cached[0] != version:
        cached = (version, reduced_copy(model, precision))
        copies[precision] = cached
    return cached[1]


def reduced_copy(model: nn.Module, precision: str) -> nn.Module:
    """A copy of `model` in eval mode whose projections run in `precision`: on a CPU every `nn.Linear`
    and GPT-2 `Conv1D` becomes a `ReducedLinear`; bf16 also casts the rest (embeddings, layer norms,
    position table) to bf16. On a GPU a bf16 copy is the model cast to bf16 (its kernels are fast)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if precision == "int8" and not on_cpu:
        raise ValueError("int8 weights run on a CPU only (dynamic quantisation)")
    twin = copy.deepcopy(model).eval()
    if precision == "bfloat16":
        twin.to(torch.bfloat16)
    if on_cpu:
        kernel = KERNELS[precision]
        for parent in list(twin.modules()):
            for name, child in list(parent.named_children()):
                weight = projection_weight(child)
                if weight is not None:
                    setattr(parent, name, kernel(weight, child.bias))
    LOG.debug("made a %s copy of the model for generation", precision)
    return twin


def projection_weight(module: nn.Module) -> torch.Tensor | None:
    """The `[out, in]` weight of an `nn.Linear` or GPT-2 `Conv1D` (stored `[in, out]`), else None."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.t()  # [in, out] -> [out, in]
    return None
