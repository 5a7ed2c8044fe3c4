"""fuse_rms_norm: x * rsqrt(mean(x^2) + eps) * scale -> ONNX RMSNormalization (opset 23).

The pattern, check and rewrite are onnxscript's own rule set (rules/fusion/_rms_normalization:
it refuses non-float inputs, a non-scalar epsilon, a non-fp32/fp64 stash type). That module is
private in onnxscript 0.7; it is the maintained implementation, so we use it rather than copy it.
RMSNormalization exists from opset 23: a model with an older opset is converted by onnxscript's
version converter first, where the caller allows it (the target's runtime/parser takes opset 23);
otherwise the fusion is refused with that reason. The converter inlines model-local functions, so
run this before the moec fusions.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import version_converter
from onnxscript.rewriter import MatchingTracer, MatchStatus
from onnxscript.rewriter.rules.fusion._rms_normalization import rms_normalization_ruleset

from moec.passes.fusions._graph import FusionLog

NAME = "fuse_rms_norm"
RMS_NORM_OPSET = 23


class _RefusalTracer(MatchingTracer):
    """Keeps every check failure (onnxscript's tracer keeps only the best partial matches)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[tuple[ir.Node, str]] = []

    def log(self, rule, container, node, match_result, status) -> None:
        if status == MatchStatus.CONDITION_FAILED:
            self.refused.append((node, match_result.reason))


def fuse_rms_norm(model: ir.Model, log: FusionLog | None = None, allow_opset_upgrade: bool = True) -> int:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < RMS_NORM_OPSET:
        if not allow_opset_upgrade:
            if log is not None:
                log.refuse(NAME, None, f"the model imports opset {opset}; RMSNormalization needs {RMS_NORM_OPSET} and the target's parser is not known to take it")
            return 0
        version_converter.convert_version(model, RMS_NORM_OPSET)
    count = rms_normalization_ruleset.apply_to_model(model)
    if log is not None:
        # With a tracer onnxscript only matches (it rewrites nothing), so this second run just
        # collects the reasons for what the first run left.
        tracer = _RefusalTracer()
        rms_normalization_ruleset.apply_to_model(model, tracer=tracer)
        for node, reason in tracer.refused:
            log.refuse(NAME, node, reason)
    return count
