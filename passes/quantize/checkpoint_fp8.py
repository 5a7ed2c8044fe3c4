"""FP8 weights that came with the checkpoint (compiler/export_fp8.py) through the optimize stage.

The fusions match weights as initializers, so before them ``fold_checkpoint_fp8`` turns each
DequantizeLinear(float8 initializer, scale initializer) of the export into a float initializer
whose value is computed only if a pass reads it (nothing does on the fused path), holding its FP8
q and scale aside. After the quantize phase, ``restore_checkpoint_fp8`` puts every such weight
that is still read back as the same DequantizeLinear of the same q and scale: the optimized graph
holds the checkpoint's FP8 bytes, never a wider copy, and never requantized values.

``--quantize fp8`` takes them as they are (the pass's fp8 layout is this one); ``--quantize
int4|int8`` requantizes them from their exact dequantized values (asked for, and recorded).
A pass that replaces such a weight by a new tensor (the partition's split, a precision change)
leaves that copy float; the sidecar counts what was restored.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

META_KEY = "moec.checkpoint_fp8"


@dataclasses.dataclass(frozen=True)
class HeldFp8:
    """The DequantizeLinear a folded weight came from."""

    q: ir.Value
    scale: ir.Value
    attributes: tuple


def _fp8_dequantize(node: ir.Node) -> bool:
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    q, scale = node.inputs
    return (q is not None and scale is not None and q.is_initializer() and scale.is_initializer()
            and q.const_value is not None and scale.const_value is not None
            and q.dtype == ir.DataType.FLOAT8E4M3FN and not node.outputs[0].is_graph_output())


def _dequantized(q: ir.Value, scale: ir.Value, axis: int, block: int | None, dtype: ir.DataType):
    from moec.passes.quantize._base import QTensor, dequantize

    def compute():
        qa = q.const_value.numpy().astype(np.float32)
        sa = scale.const_value.numpy().astype(np.float32)
        if block is None:  # per-axis: a 1D scale on `axis`, the other (2D) axis is one block
            red = 1 - axis
            w = dequantize(QTensor(qa, np.expand_dims(sa, red), None, red, qa.shape[red]))
        else:
            w = dequantize(QTensor(qa, sa, None, axis, block))
        return ir.tensor(w, dtype=ir.DataType.FLOAT) if dtype == ir.DataType.FLOAT else \
            ir.tensor(w.astype(scale.const_value.numpy().dtype), dtype=dtype)

    return ir.LazyTensor(compute, dtype=dtype, shape=q.shape)


def fold_checkpoint_fp8(model: ir.Model) -> int:
    """Each checkpoint FP8 DequantizeLinear -> a lazily dequantized initializer holding it."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if not _fp8_dequantize(node):
            continue
        q, scale = node.inputs
        axis = node.attributes["axis"].value if "axis" in node.attributes else 1
        block = node.attributes["block_size"].value if "block_size" in node.attributes else None
        out = node.outputs[0]
        name = out.name
        value = ir.Value(name=f"{name}.folded", shape=ir.Shape(q.shape), type=ir.TensorType(scale.dtype),
                         const_value=_dequantized(q, scale, axis, block, scale.dtype))
        value.meta[META_KEY] = HeldFp8(q, scale, tuple(node.attributes.values()))
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        for v in (q, scale):
            if not v.uses():
                graph.initializers.pop(v.name)
        out.name = None
        value.name = name
        graph.register_initializer(value)
        folded += 1
    return folded


def held(value: ir.Value) -> HeldFp8 | None:
    return value.meta.get(META_KEY)


def restore(graph: ir.Graph, value: ir.Value) -> ir.Value:
    """``value`` (a folded weight) -> its DequantizeLinear again, before its first reader."""
    from moec.passes.quantize.apply import _position

    h = held(value)
    for v in (h.q, h.scale):
        if v.name not in graph.initializers:
            graph.register_initializer(v)
    dq = ir.Node("", "DequantizeLinear", [h.q, h.scale], attributes=list(h.attributes),
                 name=f"{value.name}/checkpoint_fp8")
    users = [u.node for u in value.uses()]
    graph.insert_before(min(users, key=lambda n: _position(graph, n)), dq)
    out = dq.outputs[0]
    out.dtype, out.shape = value.dtype, value.shape
    value.replace_all_uses_with(out)
    graph.initializers.pop(value.name)
    out.name = value.name
    return out


def restore_checkpoint_fp8(model: ir.Model) -> int:
    """Every folded weight still read -> its checkpoint DequantizeLinear; returns how many."""
    graph = model.graph
    count = 0
    for value in list(graph.initializers.values()):
        if held(value) is not None and value.uses():
            restore(graph, value)
            count += 1
    return count
