"""MoE lowerings: each turns a fused (moec.MoEGating, moec.GroupedExperts) pair into what one
target runs. One module per lowering, each with ``lower(op, pair) -> out_TH`` (raising ``Refuse``
with a reason when it cannot express the pair) and optionally ``default_refusal(pair)``: a reason
not to take the pair when the lowering is only a target's default, not asked for (the layer then
goes to the next lowering); ``lower_moe`` drives them.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Sequence

import onnx_ir as ir

from moec.common.contract import MOEC_DOMAIN, OP_GROUPED_EXPERTS, OP_MOE_GATING
from moec.common.errors import MoecError
from moec.passes import ops
from moec.passes.fusions._graph import FusionLog, Refuse, insert_and_replace, name_new_nodes, remove_dead

_MODULES = {
    "ort": "moec.passes.lowerings.ort",
    "gather": "moec.passes.lowerings.gather",
    "dense": "moec.passes.lowerings.dense",
    "hybrid": "moec.passes.lowerings.hybrid",
    "split": "moec.passes.lowerings.split",
    "trt-native": "moec.passes.lowerings.trt_native",
    "trt-plugin": "moec.passes.lowerings.trt_plugin",
}


@dataclasses.dataclass(frozen=True)
class MoEPair:
    """One fused MoE layer: the experts node, its gating node (None when the ids/scores do not come
    straight from one) and their inputs and attributes."""

    experts: ir.Node
    gating: ir.Node | None
    x_TH: ir.Value
    ids_TK: ir.Value
    scores_TK: ir.Value
    w_gate_up_EHI2: ir.Value
    w_down_EIH: ir.Value
    experts_attrs: dict[str, Any]
    gating_attrs: dict[str, Any] | None
    logits_TE: ir.Value | None


def moe_pairs(model: ir.Model) -> list[MoEPair]:
    pairs = []
    for node in model.graph:
        if node.domain != MOEC_DOMAIN or node.op_type != OP_GROUPED_EXPERTS:
            continue
        x, ids, scores, w_gu, w_d = node.inputs
        gating = ids.producer()
        if gating is None or gating.domain != MOEC_DOMAIN or gating.op_type != OP_MOE_GATING or scores.producer() is not gating:
            gating = None
        pairs.append(MoEPair(node, gating, x, ids, scores, w_gu, w_d, ops.experts_attrs(node),
                             ops.gating_attrs(gating) if gating is not None else None,
                             gating.inputs[0] if gating is not None else None))
    return pairs


def lower_moe(model: ir.Model, lowerings: Sequence[str], target: str, log: FusionLog | None = None,
              by_default: bool = False) -> dict[str, int]:
    """Lower every moec node with the first lowering in ``lowerings`` that accepts it. A node no
    lowering accepts is an error naming the target and the node. ``by_default``: ``lowerings`` is
    the target's default list, so each lowering's ``default_refusal`` applies. Returns {lowering: count}."""
    counts: dict[str, int] = {}
    if list(lowerings) == ["function"]:
        ops.attach_functions(model)
        return {"function": len(moe_pairs(model))}
    modules = {name: importlib.import_module(_MODULES[name]) for name in lowerings if name in _MODULES}
    graph = model.graph
    for i, pair in enumerate(moe_pairs(model)):
        reasons = []
        for name in lowerings:
            if name == "function":
                reasons.append("function: kept as a moec op")
                break
            op = ops.OpBuilder()
            try:
                if by_default and (reason := getattr(modules[name], "default_refusal", lambda p: None)(pair)):
                    raise Refuse(reason)
                out = modules[name].lower(op, pair)
            except Refuse as e:
                reasons.append(f"{name}: {e}")
                if log is not None:
                    log.refuse(f"lower_{name}", pair.experts, str(e))
                continue
            name_new_nodes(op.nodes, f"moe_{name}_{i}")
            out.dtype = pair.x_TH.dtype
            insert_and_replace(graph, pair.experts, op.nodes, [pair.experts.outputs[0]], [out])
            counts[name] = counts.get(name, 0) + 1
            break
        else:
            raise MoecError(
                f"target {target}: no MoE lowering among {', '.join(lowerings)} can run {OP_GROUPED_EXPERTS} node "
                f"{pair.experts.name!r}: {'; '.join(reasons)}"
            )
    remove_dead(model)
    # Gating nodes whose experts were lowered without them, or whose experts were never fused.
    if "function" not in lowerings:
        for node in ops.moec_nodes(model):
            if node.op_type != OP_MOE_GATING:
                raise MoecError(f"target {target}: {node.op_type} node {node.name!r} was left unlowered")
            op = ops.OpBuilder()
            ids, scores = ops.build_gating(op, node.inputs[0], **ops.gating_attrs(node))
            name_new_nodes(op.nodes, f"{node.name}/std")
            insert_and_replace(graph, node, op.nodes, list(node.outputs), [ids, scores])
            remove_dead(model)
    ops.attach_functions(model)
    ops.remove_unused_functions(model)
    for node in graph:
        if node.domain not in ("", "ai.onnx") and node.domain not in model.opset_imports:
            model.opset_imports[node.domain] = 1
    return counts
