"""Small onnx-ir helpers the MoE fusions share: constants, consumers, walks and refusals.

The MoE subgraphs vary in ways a fixed pattern cannot follow (Reshape/Tile/Expand chains that
depend on the exporter, E unrolled expert chains, Add chains of any length), so those fusions
walk the graph from an anchor with these helpers; each step states what it expects and refuses
with a reason otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import MatchingTracer, MatchStatus


class Refuse(Exception):
    """A matched pattern the check refuses; the message is the reason shown to the user."""


@dataclasses.dataclass(frozen=True)
class Refusal:
    fusion: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.fusion}: node {self.node!r}: {self.reason}"


@dataclasses.dataclass
class FusionLog:
    """What one run of a fusion did: how many matches it rewrote and why it refused others."""

    refusals: list[Refusal] = dataclasses.field(default_factory=list)

    def refuse(self, fusion: str, node: ir.Node | None, reason: str) -> None:
        self.refusals.append(Refusal(fusion, node.name if node is not None else "?", reason))


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a NumPy array when it is a small constant (initializer or Constant node)."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


def consumers(value: ir.Value) -> list[ir.Node]:
    seen: list[ir.Node] = []
    for use in value.uses():
        if use.node not in seen:
            seen.append(use.node)
    return seen


def producer_is(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    if value is None:
        return None
    node = value.producer()
    if node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types:
        return node
    return None


def only_consumer(value: ir.Value, *op_types: str) -> ir.Node:
    users = consumers(value)
    if len(users) != 1:
        raise Refuse(f"{value.name!r} has {len(users)} consumers, expected one {'/'.join(op_types)}")
    node = users[0]
    if node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
        raise Refuse(f"{value.name!r} feeds {node.op_type}, expected {'/'.join(op_types)}")
    return node


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def walk_back(value: ir.Value, through: Sequence[str]) -> tuple[ir.Value, list[ir.Node]]:
    """Follow ``value`` up through producers of the given (shape-only) op types; returns the first
    value not produced by one of them and the nodes passed."""
    passed: list[ir.Node] = []
    while (node := producer_is(value, *through)) is not None:
        passed.append(node)
        value = node.inputs[0]
    return value, passed


def check_private(nodes: Iterable[ir.Node], outputs_kept: Iterable[ir.Value], fusion_nodes: set[ir.Node] | None = None) -> None:
    """Refuse when an intermediate of the matched subgraph has a consumer outside it (fusing would
    keep the old nodes alive and compute both)."""
    inside = set(fusion_nodes or nodes)
    kept = set(outputs_kept)
    for node in nodes:
        for out in node.outputs:
            if out in kept:
                continue
            if out.is_graph_output():
                raise Refuse(f"intermediate {out.name!r} is a graph output")
            for user in consumers(out):
                if user not in inside:
                    raise Refuse(
                        f"intermediate {out.name!r} (from {node.op_type} {node.name!r}) has a second consumer "
                        f"{user.op_type} {user.name!r} outside the pattern"
                    )


def insert_and_replace(graph: ir.Graph, before: ir.Node, new_nodes: Sequence[ir.Node],
                       old_values: Sequence[ir.Value], new_values: Sequence[ir.Value]) -> None:
    """Put ``new_nodes`` before ``before`` and route every use of ``old_values`` to ``new_values``
    (graph outputs too, keeping their names)."""
    graph.insert_before(before, list(new_nodes))
    for old, new in zip(old_values, new_values):
        if old.is_graph_output():
            new.name, old.name = old.name, f"{old.name}__replaced"
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        if new.dtype is None:
            new.dtype = old.dtype
        if new.shape is None and old.shape is not None:
            new.shape = old.shape


def name_new_nodes(nodes: Sequence[ir.Node], prefix: str) -> None:
    for i, node in enumerate(nodes):
        node.name = f"{prefix}/{node.op_type}_{i}"
        for j, v in enumerate(node.outputs):
            if not v.name:
                v.name = f"{prefix}/{node.op_type.lower()}_{i}_{j}"


def remove_dead(model: ir.Model) -> None:
    common_passes.RemoveUnusedNodesPass()(model)


def nodes_of(model: ir.Model, op_type: str, domain: str = "") -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op_type and n.domain in ({domain, "ai.onnx"} if domain == "" else {domain})]


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else value.shape.rank()


def dim(value: ir.Value, i: int):
    if value.shape is None or value.shape.rank() <= abs(i) - (1 if i < 0 else 0):
        return None
    d = value.shape[i]
    return d if isinstance(d, int) else None


class _RefusalTracer(MatchingTracer):
    """Keeps every check failure (onnxscript's tracer keeps only the best partial matches)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[tuple[ir.Node, str]] = []

    def log(self, rule, container, node, match_result, status) -> None:
        if status == MatchStatus.CONDITION_FAILED:
            self.refused.append((node, match_result.reason))


def collect_refusals(ruleset, model: ir.Model, fusion: str, log: FusionLog | None) -> None:
    """Log why an onnxscript rule set refused what its last run left. With a tracer onnxscript only
    matches (it rewrites nothing), so this second run just collects the reasons."""
    if log is None:
        return
    tracer = _RefusalTracer()
    ruleset.apply_to_model(model, tracer=tracer)
    for node, reason in tracer.refused:
        log.refuse(fusion, node, reason)


def ensure_opset(model: ir.Model, opset: int, fusion: str, op_type: str, log: FusionLog | None,
                 allow_upgrade: bool) -> bool:
    """Make the model import at least ``opset`` (onnxscript's version converter), or log a refusal
    and return False when the caller does not allow the upgrade (the target's parser may not take
    it).

    The converter inlines every model-local function, and the fused moec ops carry theirs
    (ops.attach_functions): converted as they are, MoEGating / GroupedExperts would dissolve into
    their bodies, leaving anything that holds those nodes (a quantize site's uses) pointing at
    nodes no longer in the graph, and the layers unfused. So moec's bodies are held aside during
    the conversion (the moec nodes stay, as ops of another domain) and rebuilt at the new opset."""
    from onnxscript import version_converter

    from moec.common.contract import MOEC_DOMAIN

    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if current >= opset:
        return True
    if not allow_upgrade:
        if log is not None:
            log.refuse(fusion, None, f"the model imports opset {current}; {op_type} needs {opset} and the target's parser is not known to take it")
        return False
    held = [key for key in model.functions if key[0] == MOEC_DOMAIN]
    for key in held:
        del model.functions[key]
    version_converter.convert_version(model, opset)
    if held:
        from moec.passes import ops

        ops.attach_functions(model)
    return True
