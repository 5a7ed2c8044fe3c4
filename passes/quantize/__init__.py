"""Weight quantization: one file per format (int4.py, int8.py, fp8.py, nvfp4.py), each a ``Format`` record
behind one interface (``_base.py``); ``QuantizeSpec`` is what the optimize stage asks for;
``apply.quantize_weights`` is the pass.

Scope, as data (``SCOPES``): which kinds of weight a scope quantizes.
  experts  the routed experts (the fused moec.GroupedExperts weights)      the default
  mlp      + the shared expert and the dense layers' MLPs
  all      + the attention projections (q, k, v, o)
The routing (router weights, top-k, sigmoid) is never quantized, and neither are the embedding,
lm_head and norms: no scope names them.
"""

from __future__ import annotations

import dataclasses
import re

from moec.common import contract
from moec.common.errors import MoecError
from moec.passes.quantize._base import Format, QTensor, dequantize
from moec.passes.quantize.fp8 import FP8
from moec.passes.quantize.int4 import DEFAULT_GROUP, GROUPS, INT4
from moec.passes.quantize.int8 import INT8
from moec.passes.quantize.nvfp4 import NVFP4

FORMATS: dict[str, Format] = {f.name: f for f in (INT4, INT8, FP8, NVFP4)}
SCOPES: dict[str, tuple[str, ...]] = {
    "experts": ("experts",),
    "mlp": ("experts", "mlp"),
    "all": ("experts", "mlp", "attention"),
}
# Weight kinds found by initializer name (the export keeps the checkpoint's parameter names). The
# router matches neither: routing stays full precision whatever the scope.
WEIGHT_KINDS: dict[str, re.Pattern] = {
    "mlp": re.compile(r"(^|\.)feed_forward\.(shared_expert\.)?(gate|up|down)_proj\.weight$"),
    "attention": re.compile(r"(^|\.)self_attn\.[qkvo]_proj\.weight$"),
}
# What the sidecar records as the calibration: round-to-nearest weights need none.
CALIBRATION_NONE = "none (round-to-nearest, weight-only)"
# How int4 weights are rounded: rtn round-to-nearest; clip + a per-block clipping search (clip.py,
# no data); awq + activation-aware per-input-channel scales (awq.py, calibrated) then clip; gptq
# rounding with error feedback on the calibration Hessian (gptq.py); awq-gptq awq's scales, then
# gptq on the scaled weight.
METHODS = contract.QUANT_METHODS
# FP8 activations: none (weight-only) | static (per-tensor E4M3 scales calibrated, fp8_act.py) |
# static-no-down (the same, but every down_proj's input stays in float: W8A16 there). int4 on ort:
# dynamic (ONNX Runtime's MatMulNBits quantizes each row's activations to int8 per block of the
# weight's group at run time, accuracy_level 4; as llama.cpp's Q4_0 dot products do).
ACTIVATIONS = contract.QUANT_ACTIVATIONS
CALIBRATED_METHODS = ("awq", "gptq", "awq-gptq")
GPTQ_METHODS = ("gptq", "awq-gptq")
AWQ_METHODS = ("awq", "awq-gptq")
_ACTIVATION_RECORDS = {"none": "none (weight-only)", "static": "fp8 e4m3 static per-tensor",
                       "static-no-down": "fp8 e4m3 static per-tensor, down_proj inputs in float (weight-only)",
                       "dynamic": "int8 dynamic per row and weight group (ONNX Runtime MatMulNBits accuracy_level 4)"}
_ACTIVATION_LABELS = {"none": "", "static": "-w8a8", "static-no-down": "-w8a8-no-down", "dynamic": "-a8"}
STATIC_ACTIVATIONS = ("static", "static-no-down")


@dataclasses.dataclass(frozen=True)
class QuantizeSpec:
    """A validated request: format, group size (blockwise formats), scope, symmetric."""

    format: str
    group: int = DEFAULT_GROUP
    scope: str = "experts"
    symmetric: bool = True
    method: str = "rtn"  # int4: rtn | clip | awq | gptq | awq-gptq
    activations: str = "none"  # fp8: none | static | static-no-down; int4: none | dynamic
    calibration: str | None = None  # prompt text for the calibrated methods / activations; None: the shipped one

    @property
    def fmt(self) -> Format:
        return FORMATS[self.format]

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED_METHODS or self.activations in STATIC_ACTIVATIONS

    def quantize(self, w, axis: int, block: int, importance=None, hessian=None) -> QTensor:
        """The format's quantizer, or the clipping search / GPTQ where the method asks for it
        (``importance``: awq's per-channel weights of the clipping error, clip.py; ``hessian``:
        gptq's calibrated H, gptq.py; a gptq weight without one rounds to nearest)."""
        if self.method in GPTQ_METHODS and hessian is not None:
            from moec.passes.quantize.gptq import quantize_int4_gptq

            return quantize_int4_gptq(w, axis, block, self.symmetric, hessian)
        if self.method in ("clip", "awq"):
            from moec.passes.quantize.clip import quantize_int4_clip

            return quantize_int4_clip(w, axis, block, self.symmetric, importance=importance)
        return self.fmt.quantize(w, axis, block, self.symmetric)

    def block_for(self, k: int) -> int:
        """Elements per scale along a reduction axis of length ``k``."""
        if self.fmt.fixed_block:
            return self.fmt.fixed_block
        return self.group if self.fmt.granularity == "block" else k

    def label(self) -> str:
        """fp32-style names the benchmarks and sidecar use: int4-g128, int4-g32-asym, int8, fp8, nvfp4."""
        if self.fmt.granularity != "block" or self.fmt.fixed_block:
            return self.format + _ACTIVATION_LABELS[self.activations]
        return (f"{self.format}-g{self.group}" + ("" if self.symmetric else "-asym")
                + ("" if self.method == "rtn" else f"-{self.method}") + _ACTIVATION_LABELS[self.activations])

    def record(self) -> dict:
        """What the sidecar and the manifest say about the quantization."""
        extra = {"scales": "e4m3 per block of 16 along K, times one fp32 global scale per tensor"} \
            if self.format == "nvfp4" else {}
        return {
            "format": self.format,
            "group_size": self.group if self.fmt.granularity == "block" else None,
            "granularity": "block" if self.fmt.granularity == "block" else "per_output_channel",
            "symmetric": self.symmetric,
            "scope": self.scope,
            "kinds": list(SCOPES[self.scope]),
            "method": self.method,
            "activations": _ACTIVATION_RECORDS[self.activations],
            "calibration": (calibration_file(self).name if self.calibrated else CALIBRATION_NONE if self.method == "rtn"
                            else "none (per-block clipping search on the weights alone)"),
            "routing": "full precision",
            **extra,
        }


def calibration_file(spec: QuantizeSpec):
    """The prompt text calibration reads: the user's, or the one shipped beside this file."""
    from pathlib import Path

    return Path(spec.calibration) if spec.calibration is not None else Path(__file__).with_name("calibration.txt")


def make_spec(format: str | None, group: int | None = None, scope: str | None = None,
              symmetric: bool = True, method: str = "rtn", activations: str = "none",
              calibration: str | None = None) -> QuantizeSpec | None:
    """The spec for the optimize stage's fields (None: no quantization); named errors for a bad one."""
    if format is None:
        if (group is not None or (scope is not None and scope != "experts") or not symmetric or method != "rtn"
                or activations != "none" or calibration is not None):
            raise MoecError("--quantize-group / --quantize-scope / --quantize-asymmetric / --quantize-method / "
                            "--quantize-activations / --quantize-calibration need --quantize int4|int8|fp8|nvfp4")
        return None
    if method not in METHODS:
        raise MoecError(f"--quantize-method {method!r}: choose one of {', '.join(METHODS)}")
    if method != "rtn" and format != "int4":
        raise MoecError(f"--quantize-method {method}: applies to int4; {format} rounds to nearest (drop it)")
    if activations not in ACTIVATIONS:
        raise MoecError(f"--quantize-activations {activations!r}: choose one of {', '.join(ACTIVATIONS)}")
    if activations in STATIC_ACTIVATIONS and format != "fp8":
        raise MoecError(f"--quantize-activations {activations}: FP8 activations go with --quantize fp8, not {format}")
    if activations == "dynamic" and format != "int4":
        raise MoecError(f"--quantize-activations dynamic: int8 activations at run time go with --quantize int4 "
                        f"(ONNX Runtime's MatMulNBits), not {format}")
    if calibration is not None and method not in CALIBRATED_METHODS and activations not in STATIC_ACTIVATIONS:
        raise MoecError("--quantize-calibration: nothing calibrates (use it with --quantize-method "
                        f"{'|'.join(CALIBRATED_METHODS)} or --quantize-activations static|static-no-down)")
    if calibration is not None:
        from pathlib import Path

        if not Path(calibration).is_file():
            raise MoecError(f"--quantize-calibration {calibration}: no such file (a UTF-8 text of prompts)")
    if format not in FORMATS:
        raise MoecError(f"--quantize {format!r}: choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    scope = scope or "experts"
    if scope not in SCOPES:
        raise MoecError(f"--quantize-scope {scope!r}: choose one of {', '.join(SCOPES)}")
    if fmt.fixed_block:
        if group is not None and group != fmt.fixed_block:
            raise MoecError(f"--quantize-group {group}: {format} has blocks of {fmt.fixed_block} by definition; "
                            "drop --quantize-group")
        group = fmt.fixed_block
    elif fmt.granularity != "block":
        if group is not None:
            raise MoecError(f"--quantize-group applies to int4 (blockwise); {format} has one scale per output "
                            "channel: drop --quantize-group")
        group = DEFAULT_GROUP
    elif group is None:
        group = DEFAULT_GROUP
    elif group not in GROUPS:
        raise MoecError(f"--quantize-group {group}: choose one of {', '.join(map(str, GROUPS))}")
    if not symmetric and not fmt.asymmetric:
        raise MoecError(f"--quantize-asymmetric: {format} is symmetric only (int4 has an asymmetric variant)")
    return QuantizeSpec(format, group, scope, symmetric, method, activations,
                        None if calibration is None else str(calibration))


__all__ = ["ACTIVATIONS", "FORMATS", "METHODS", "calibration_file", "SCOPES", "WEIGHT_KINDS", "Format", "QTensor", "QuantizeSpec", "dequantize", "make_spec"]
