"""Pre-quantized checkpoints: which ``quantization_config`` moec reads, and the FP8 (fbgemm_fp8)
tensor layouts it loads.

Supported: ``quant_method = "fbgemm_fp8"`` (Llama-4-Maverick-17B-128E-Instruct-FP8): F8_E4M3
weights with a float32 scale per output row, in either layout
- per expert (the published checkpoint; vLLM's llama4 loader reads it):
  ``...feed_forward.experts.{e}.{gate,up,down}_proj.weight`` [out, in] F8_E4M3 and
  ``...weight_scale`` [out, 1]; likewise any Linear ``X.weight`` + ``X.weight_scale``;
- stacked (transformers' FbgemmFp8Llama4TextExperts): ``experts.gate_up_proj`` [E, H, 2I] F8_E4M3
  with ``experts.gate_up_proj_scale`` [E, 1, 2I], ``experts.down_proj`` [E, I, H] with
  ``experts.down_proj_scale`` [E, H, 1].
``modules_to_not_convert`` names the modules kept in bf16; an FP8 tensor inside one of them is a
contradiction and refused. Any other ``quant_method`` (or a config without one) is refused by name:
moec would otherwise read the weights as if they were not quantized.

Each FP8 weight is assembled into an ``Fp8Weight``: the checkpoint's FP8 values laid out as the
model's parameter (a stack / transpose of the stored bytes, no arithmetic) and its scales. moec's
torch model holds float weights, so where it needs values they are dequantized exactly (q * scale,
in fp32) as they are read; the export instead writes the FP8 values and scales themselves as a
DequantizeLinear (compiler/export_fp8.py), so the artifact never holds them in a wider dtype.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from moec.common.errors import MoecError

SUPPORTED_METHODS = ("fbgemm_fp8",)
FP8_FILE_DTYPES = ("F8_E4M3",)
_PER_EXPERT = re.compile(r"^(?P<base>.*\.feed_forward\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_STACKED = re.compile(r"^(?P<base>.*\.feed_forward\.experts)\.(?P<proj>gate_up|down)_proj$")


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    method: str
    modules_to_not_convert: tuple[str, ...]

    def record(self) -> dict:
        return {"quant_method": self.method, "modules_to_not_convert": list(self.modules_to_not_convert)}


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """One FP8 weight in the layout of the model's parameter: ``q`` [E, K, N] (experts) or [N, K]
    (a Linear), float8_e4m3fn; ``scale`` float32 with K shortened to 1 ([E, 1, N], [N, 1]): one
    scale per output channel, w = q * scale."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.q.float() * self.scale).to(dtype)


def read_quantization_config(raw: dict, source: str) -> QuantizationConfig | None:
    """The checkpoint's quantization_config (top level, or the text config's), validated."""
    q = raw.get("quantization_config")
    if q is None and isinstance(raw.get("text_config"), dict):
        q = raw["text_config"].get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise MoecError(f"{source}: quantization_config must be an object, got {type(q).__name__}")
    method = q.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise MoecError(f"{source}: quantization_config.quant_method {method!r} is not supported; moec loads "
                        f"{', '.join(SUPPORTED_METHODS)} checkpoints (or unquantized bf16/fp16/fp32 ones, which "
                        "`moec optimize --quantize int4|int8|fp8` quantizes)")
    skip = q.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        raise MoecError(f"{source}: quantization_config.modules_to_not_convert must be a list of module names")
    return QuantizationConfig(method, tuple(skip))


def is_fp8_part(name: str) -> bool:
    """A tensor name that only exists in an FP8 checkpoint (a scale, or a per-expert weight)."""
    return name.endswith(("weight_scale", "_proj_scale")) or _PER_EXPERT.match(name) is not None


def _not_converted(name: str, qc: QuantizationConfig) -> str | None:
    for module in qc.modules_to_not_convert:
        if name == module or name.startswith(module + ".") or f".{module}." in f".{name}":
            return module
    return None


def assemble(raw: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], qc: QuantizationConfig,
             file_of: dict[str, str]) -> dict[str, Fp8Weight]:
    """The model's FP8 weights from the FP8 parts in ``raw`` (weights and scales by checkpoint
    name, prefix removed). Named errors for a missing, orphaned or mismatched scale."""
    out: dict[str, Fp8Weight] = {}
    used: set[str] = set()

    def scale_for(weight: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in raw:
            raise MoecError(f"{file_of[weight]}: FP8 tensor {weight!r} has no scale {key!r}; the checkpoint is incomplete "
                            "(re-download it)")
        s = raw[key]
        if tuple(s.shape) != shape:
            raise MoecError(f"{file_of[key]}: scale {key!r} has shape {list(s.shape)}, expected {list(shape)} for "
                            f"{weight!r} {list(raw[weight].shape)} (one scale per output row)")
        used.add(key)
        return s.float()

    def per_expert_parts(by_e: dict[int, tuple[torch.Tensor, torch.Tensor]], E: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [out, in] per expert -> the stacked [E, in, out] layout; the scales [out, 1] -> [E, 1, out].
        q = torch.stack([by_e[e][0].view(torch.uint8).t() for e in range(E)]).view(torch.float8_e4m3fn)
        return q, torch.stack([by_e[e][1].t() for e in range(E)])

    def check_convertible(name: str) -> None:
        if (module := _not_converted(name, qc)) is not None:
            raise MoecError(f"{file_of[name]}: {name!r} is FP8 but quantization_config.modules_to_not_convert lists "
                            f"{module!r}; the checkpoint contradicts its config")

    per_expert: dict[tuple[str, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, t in raw.items():
        if name.endswith(("weight_scale", "_proj_scale")):
            continue
        check_convertible(name)
        if t.dtype != torch.float8_e4m3fn:
            raise MoecError(f"{file_of[name]}: {name!r} is {t.dtype}, expected F8_E4M3 in an fbgemm_fp8 checkpoint")
        used.add(name)
        if m := _PER_EXPERT.match(name):
            s = scale_for(name, name + "_scale", (t.shape[0], 1))
            per_expert.setdefault((m["base"], m["proj"]), {})[int(m["e"])] = (t, s)  # [out, in], [out, 1]
        elif m := _STACKED.match(name):
            E, K, N = t.shape
            if m["proj"] == "gate_up":
                s = scale_for(name, name + "_scale", (E, 1, N))
            else:
                s = scale_for(name, name + "_scale", (E, N, 1)).transpose(1, 2).contiguous()
            out[name] = Fp8Weight(t, s)
        elif name.endswith(".weight") and t.dim() == 2:
            out[name] = Fp8Weight(t, scale_for(name, name + "_scale", (t.shape[0], 1)))
        else:
            raise MoecError(f"{file_of[name]}: FP8 tensor {name!r} is not a Linear weight or a stacked expert weight "
                            "moec knows how to dequantize")
    stacked: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (base, proj), by_e in per_expert.items():
        stacked_name = f"{base}.{'down' if proj == 'down' else 'gate_up'}_proj"
        if stacked_name not in expected:
            raise MoecError(f"unexpected FP8 experts under {base!r}; not part of the Llama 4 text model config.json describes")
        E = expected[stacked_name][0]
        missing = sorted(set(range(E)) - set(by_e))
        if missing:
            raise MoecError(f"FP8 checkpoint: {base}.{missing[0]}.{proj}_proj.weight is missing "
                            f"({len(missing)} of {E} experts lack {proj}_proj)")
        stacked.setdefault(base, {})[proj] = per_expert_parts(by_e, E)
    for base, parts in stacked.items():
        if ("gate" in parts) != ("up" in parts):
            have, lack = ("gate", "up") if "gate" in parts else ("up", "gate")
            raise MoecError(f"FP8 checkpoint: {base} has {have}_proj but no {lack}_proj weights")
        if "down" in parts:
            out[f"{base}.down_proj"] = Fp8Weight(*parts["down"])
        if "gate" in parts:
            (qg, sg), (qu, su) = parts["gate"], parts["up"]
            q = torch.cat([qg.view(torch.uint8), qu.view(torch.uint8)], dim=-1).view(torch.float8_e4m3fn)
            out[f"{base}.gate_up_proj"] = Fp8Weight(q, torch.cat([sg, su], dim=-1))
    orphans = sorted(k for k in raw if k not in used)
    if orphans:
        raise MoecError(f"{file_of[orphans[0]]}: scale {orphans[0]!r} belongs to no FP8 weight; the checkpoint's tensors "
                        "do not match each other")
    return out
