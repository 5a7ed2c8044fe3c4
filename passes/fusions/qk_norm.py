"""fuse_qk_norm: Llama 4's weightless QK norm x * rsqrt(mean(x^2) + eps) -> ONNX RMSNormalization (opset 23).

models/llama4.py ``rms_normalize`` on q and k after RoPE (RoPE layers with use_qk_norm) has no
weight, so onnxscript's RMSNormalization rule (fuse_rms_norm), which wants the scale multiply,
leaves it as six nodes per tensor, which torch 2.13 exports as::

    y = Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), [-1], keepdims=1), eps))))

This rule (onnxscript's pattern rewriter: pattern, check, rewrite) makes it one
RMSNormalization(x, ones[D], axis=-1, epsilon=eps, stash_type=FLOAT). The check refuses, with a
reason, what would change the numbers: an exponent other than 2, a mean over another axis or
without keepdims, a non-scalar or non-constant epsilon, a non-static last axis, a dtype other than
float32 (an fp16 export normalizes in fp32 between Casts, so the matched x is fp32 there too).
Run it after fuse_rms_norm (the pipeline does): before, it would also take the weightless inner
part of every weighted norm (the same numbers, but one Mul more than RMSNormalization with the weight).

Where it pays: ONNX Runtime 1.32 CPU, 24 chained norms of [1, 1, 8, 64] (a decode step's q of the
h512 benchmark), 2 threads, graph optimizations on (ORT does not fuse this Reciprocal form itself):
12-18 us per norm as RMSNormalization, 20-23 as com.microsoft SimplifiedLayerNormalization, 25-27 as
the six nodes (benchmarks/qk_norm_forms.py, shared 2-core host at load 5-7: indicative). Numbers:
2.4e-7 max abs difference on unit-scale inputs. On for ``--target ort``; TensorRT was not checked.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from moec.passes.fusions._graph import FusionLog, collect_refusals, ensure_opset

NAME = "fuse_qk_norm"
QK_NORM_OPSET = 23


def _scalar(value: ir.Value | None) -> float | None:
    t = None if value is None else ir.convenience.get_const_tensor(value)
    return None if t is None or t.numpy().size != 1 else float(t.numpy().ravel()[0])


class _WeightlessRmsNorm(pattern.RewriteRuleClassBase):
    def __init__(self) -> None:
        super().__init__(name="WeightlessRMSNormalization23", remove_nodes=True)

    def pattern(self, op, x, two, axes, eps):
        mean = op.ReduceMean(op.Pow(x, two), axes, _allow_other_attributes=True, _outputs=["mean"])
        return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean, eps))))

    def check(self, context, x, two, axes, eps, mean, **_):
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail(f"x is {x.dtype}: float32 only", x)
        if x.shape is None or not isinstance(x.shape[-1], int):
            return result.fail("x's last axis is not static (the unit scale needs its size)", x)
        if _scalar(two) != 2.0:
            return result.fail("not a square (Pow exponent is not the constant 2)", two)
        t = ir.convenience.get_const_tensor(axes)
        rank = x.shape.rank()
        if t is None or [int(a) for a in t.numpy().ravel()] not in ([-1], [rank - 1]):
            return result.fail("the mean is not over the last axis", axes)
        node = mean.producer()
        if node.attributes.get_int("keepdims", 1) != 1 or node.attributes.get_int("noop_with_empty_axes", 0) != 0:
            return result.fail("the mean does not keep its axis", mean)
        if _scalar(eps) is None:
            return result.fail("epsilon is not a constant scalar", eps)
        return result

    def rewrite(self, op, x, eps, **_):
        ones = op.Constant(value=ir.tensor(np.ones(x.shape[-1], np.float32)))
        return op.RMSNormalization(x, ones, axis=-1, epsilon=_scalar(eps), stash_type=int(ir.DataType.FLOAT))


qk_norm_ruleset = pattern.RewriteRuleSet([_WeightlessRmsNorm.rule()])


def fuse_qk_norm(model: ir.Model, log: FusionLog | None = None, allow_opset_upgrade: bool = True) -> int:
    if not ensure_opset(model, QK_NORM_OPSET, NAME, "RMSNormalization", log, allow_opset_upgrade):
        return 0
    count = qk_norm_ruleset.apply_to_model(model)
    collect_refusals(qk_norm_ruleset, model, NAME, log)
    return count
