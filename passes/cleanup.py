"""Clean-up passes, all from onnx-ir / onnxscript's optimizer (none hand-written).

Each returns how many nodes it removed or rewrote. Constant folding keeps its size limits, so it
never materialises a weight-sized tensor (and never reads external weights into memory); it does
not inline functions, so fused moec ops keep their model-local bodies.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import onnxscript.rewriter


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph)


def _delta(fn):
    def run(model: ir.Model) -> int:
        before = _count_nodes(model)
        modified = fn(model)
        removed = before - _count_nodes(model)
        return removed if removed > 0 else int(bool(modified))

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


@_delta
def fold_constants(model: ir.Model) -> bool:
    """Constant folding (onnxscript.optimizer), shape ops included where shapes are static."""
    return onnxscript.optimizer.fold_constants_ir(model, onnx_shape_inference=False).modified


@_delta
def simplify(model: ir.Model) -> bool:
    """onnxscript's default rewrite rules: no-op removal, Reshape/Slice/Cast simplifications."""
    return onnxscript.rewriter.RewritePass(onnxscript.rewriter._DEFAULT_REWRITE_RULES)(model).modified


@_delta
def eliminate_identities(model: ir.Model) -> bool:
    return common_passes.IdentityEliminationPass()(model).modified


@_delta
def remove_unused(model: ir.Model) -> bool:
    """Dead nodes, then unused functions and opset imports."""
    modified = common_passes.RemoveUnusedNodesPass()(model).modified
    modified |= common_passes.RemoveUnusedFunctionsPass()(model).modified
    modified |= common_passes.RemoveUnusedOpsetsPass()(model).modified
    return modified


@_delta
def eliminate_common_subexpressions(model: ir.Model) -> bool:
    return common_passes.CommonSubexpressionEliminationPass()(model).modified


def untyped_values(model: ir.Model) -> list[ir.Value]:
    """Node outputs (subgraphs included) with no dtype."""
    return [o for n in ir.traversal.RecursiveGraphIterator(model.graph) for o in n.outputs if o.dtype is None]


def infer_types(model: ir.Model) -> int:
    """onnx's shape inference (through onnx-ir's pass, which leaves big weights out of the proto it
    hands over) so that the values rewrites and lowerings created carry dtype and shape again.

    Not strict: a node of a domain onnx has no schema for (com.microsoft, TensorRT's) is skipped,
    not fatal; the lowerings type those nodes' outputs themselves. Returns how many values gained
    a dtype. Only at the end of the pipeline: the fusions compare the exporter's symbolic dims, which
    inference may rename.
    """
    before = len(untyped_values(model))
    common_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return before - len(untyped_values(model))


CLEANUP_PASSES = (fold_constants, simplify, eliminate_identities, eliminate_common_subexpressions, remove_unused)
