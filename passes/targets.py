"""Targets (``ort``, ``trt:<arch>``, ``trt-rtx:<arch>``) and which MoE lowering each can run.

Defaults, fastest valid first (the lowering driver takes the first one a layer allows):
- ``ort``: ``split`` (per-expert MatMuls, which use every intra-op thread at decode, where
  com.microsoft.MoE gives a token's expert one thread; up to 32 experts, float experts), else
  com.microsoft.MoE (each expert in two slices: two threads) / QMoE (one fused op with a top-k
  grouped expert loop inside), else ``hybrid``. Rank graphs
  (``--tp/--ep``) start at com.microsoft.MoE.
- ``trt:sm100|sm103|sm110``: TensorRT's native IMoELayer (``trt-native``), else ``hybrid``.
- every other TensorRT arch: ``hybrid``. TensorRT has no grouped GEMM in standard ops. Of the
  standard-op forms, ``gather`` reads only the K chosen experts per token (decode, the step that
  dominates generation, reads K/E of the expert weights) but copies T*K expert matrices, which
  a long prompt cannot afford; ``dense`` always reads and multiplies all E. ``hybrid`` is one If
  over the two: gather while T*K <= E, dense above, so decode gets gather and prefill dense.
  ``trt-plugin`` (moec's grouped kernel) is faster where its plugin library is loaded, so it is
  opt-in (``--moe-lowering trt-plugin``): an engine that needs it does not run without it.
TensorRT-RTX has no IMoELayer on any arch it targets (SM75-SM121, FACTS.md), so trt-rtx never
takes ``trt-native``; nor ``trt-plugin`` (its ONNX parser aborts the process on a Python plugin).
``gather`` builds there with the export's RoPE ops (compiler/pipeline.py's fusion list says why).
Each flavour's archs, the GPU names and the refusal text are one table for every command (moec.common.archs).
"""

from __future__ import annotations

import dataclasses

from moec.common.archs import FLAVOUR_NAMES, STATIC_ARCHS, normalize_arch  # noqa: F401 - FLAVOUR_NAMES: re-export
from moec.common.archs import arch_unsupported_reason as arch_unsupported_reason
from moec.common.errors import MoecError

KINDS = ("ort", "trt", "trt-rtx")
LOWERINGS = ("ort", "split", "hybrid", "gather", "dense", "trt-native", "trt-plugin", "function")
# The GPU archs each TensorRT flavour can build for, the GPU names and the refusal text: one table
# for every command (moec.common.archs).
ARCHS = STATIC_ARCHS
# IMoELayer runs on Blackwell datacenter and Thor only (public TensorRT docs; FACTS.md).
TRT_NATIVE_MOE_ARCHS = frozenset({"sm100", "sm103", "sm110"})


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str
    arch: str | None = None

    def __str__(self) -> str:
        return self.kind if self.arch is None else f"{self.kind}:{self.arch}"

    @property
    def is_trt(self) -> bool:
        return self.kind in ("trt", "trt-rtx")


def parse_target(text: str) -> Target:
    kind, _, arch = text.partition(":")
    if kind not in KINDS:
        raise MoecError(f"unknown target {text!r}; use ort, trt:<arch> or trt-rtx:<arch> (arch like sm89, sm90, sm100)")
    if kind == "ort":
        if arch:
            raise MoecError(f"target {text!r}: ort takes no arch")
        return Target("ort")
    if not arch:
        raise MoecError(f"target {text!r} needs an arch like {kind}:sm89 or a GPU name like {kind}:l4")
    if "," in arch:
        raise MoecError(f"target {text!r}: one graph is optimized for one arch; give one (moec compile and moec build "
                        "take several)")
    try:
        arch = normalize_arch(arch)
    except MoecError as e:
        raise MoecError(f"target {text!r}: {e}") from None
    if reason := arch_unsupported_reason(kind, arch):
        raise MoecError(f"target {text!r}: {reason}")
    return Target(kind, arch)


def unsupported_reason(target: Target, lowering: str) -> str | None:
    """Why ``target`` cannot run ``lowering`` (None when it can)."""
    if lowering not in LOWERINGS:
        return f"unknown MoE lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}"
    if lowering == "ort" and target.kind != "ort":
        return "com.microsoft.MoE is an ONNX Runtime op; TensorRT's parser does not take it"
    if lowering == "split" and target.kind != "ort":
        return "split (per-expert weights over tokens sorted by expert, MatMulNBits for int4) is checked on ONNX Runtime only"
    if lowering == "trt-native":
        if target.kind == "trt-rtx":
            return "TensorRT-RTX has no IMoELayer build for any arch it targets"
        if target.kind != "trt" or target.arch not in TRT_NATIVE_MOE_ARCHS:
            return f"TRT_MoE (IMoELayer) runs only on {', '.join(sorted(TRT_NATIVE_MOE_ARCHS))} TensorRT targets"
    if lowering == "trt-plugin" and not target.is_trt:
        return "the moec TensorRT plugin exists only inside TensorRT engines"
    if lowering == "trt-plugin" and target.kind == "trt-rtx":
        # runtime/trt_plugin.py: TensorRT-RTX 1.7's parser aborts the process on a Python IPluginV3.
        return ("TensorRT-RTX aborts the process when its ONNX parser meets the moec plugin; "
                f"use hybrid (the default), gather or dense, or full TensorRT (trt:{target.arch})")
    if lowering == "function" and target.is_trt:
        choices = "hybrid, gather or dense" if target.kind == "trt-rtx" else "hybrid, gather, dense or trt-plugin"
        return f"moec ops as ONNX functions: TensorRT would inline the all-experts body; pick {choices}"
    return None


def default_lowerings(target: Target) -> tuple[str, ...]:
    if target.kind == "ort":
        return ("split", "ort", "hybrid")
    if target.kind == "trt" and target.arch in TRT_NATIVE_MOE_ARCHS:
        return ("trt-native", "hybrid")
    return ("hybrid",)


def lowerings_for(target: Target, requested: str | None) -> tuple[str, ...]:
    """The lowering preference list: the target's defaults, or exactly the one requested."""
    if requested is None or requested == "auto":
        return default_lowerings(target)
    reason = unsupported_reason(target, requested)
    if reason is not None:
        raise MoecError(f"target {target}: MoE lowering {requested!r} cannot run there: {reason}")
    return (requested,)
