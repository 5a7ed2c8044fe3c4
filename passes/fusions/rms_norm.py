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
from onnxscript.rewriter.rules.fusion._rms_normalization import rms_normalization_ruleset

from moec.passes.fusions._graph import FusionLog, collect_refusals, ensure_opset

NAME = "fuse_rms_norm"
RMS_NORM_OPSET = 23


def fuse_rms_norm(model: ir.Model, log: FusionLog | None = None, allow_opset_upgrade: bool = True) -> int:
    if not ensure_opset(model, RMS_NORM_OPSET, NAME, "RMSNormalization", log, allow_opset_upgrade):
        return 0
    count = rms_normalization_ruleset.apply_to_model(model)
    collect_refusals(rms_normalization_ruleset, model, NAME, log)
    return count
