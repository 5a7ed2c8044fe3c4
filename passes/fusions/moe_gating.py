"""fuse_moe_gating: the router's top-k subgraph -> one moec.MoEGating node.

Pattern (anchored at TopK; ``L`` is the [T, E] router logits):
  sigmoid (Llama 4):  v, i = TopK(L, k); dense = [Cast] Sigmoid([Cast] ScatterElements(fill(-inf), i, v)) [Cast]
  softmax (Mixtral):  v, i = TopK(Softmax(L), k); [v = v / ReduceSum(v)]; dense = ScatterElements(fill(0), i, v) [Cast]
where fill(c) is Expand(c, Shape(.)), ConstantOfShape or a constant.
Check (refusal reasons): k a constant in [1, E]; logits [T, E] of float32/float16/bfloat16; the
fill is -inf (sigmoid) / 0 (softmax); no intermediate (top-k values or indices, the scatter) has a
consumer outside the pattern.
Rewrite: ids, scores = MoEGating(L); dense = ScatterElements(zeros like L, ids, scores): the dense
[T, E] score matrix the experts consume stays as it was, so this fusion is exact on its own, and
``fuse_grouped_experts`` then replaces the dense matrix's consumers, reading ids and scores.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from moec.passes import ops
from moec.passes.fusions._graph import (
    FusionLog, Refuse, attr, check_private, const_array, consumers, insert_and_replace, name_new_nodes,
    producer_is, rank, remove_dead,
)

NAME = "fuse_moe_gating"


def _fill_constant(value: ir.Value) -> tuple[float, list[ir.Node]]:
    """The scalar a fill tensor is filled with, and the nodes that build it."""
    arr = const_array(value)
    if arr is not None and arr.size and np.all(arr == arr.flat[0]):
        return float(arr.flat[0]), []
    node = value.producer()
    if node is not None and node.op_type == "Expand":
        c = const_array(node.inputs[0])
        shape_node = producer_is(node.inputs[1], "Shape")
        if c is not None and c.size == 1:
            return float(c.flat[0]), [node] + ([shape_node] if shape_node else [])
    if node is not None and node.op_type == "ConstantOfShape":
        t = attr(node, "value")
        c = 0.0 if t is None else float(t.numpy().flat[0])
        shape_node = producer_is(node.inputs[0], "Shape")
        return c, [node] + ([shape_node] if shape_node else [])
    raise Refuse(f"the scatter's data {value.name!r} is not a constant fill")


def _match(topk: ir.Node) -> dict:
    logits = topk.inputs[0]
    k_arr = const_array(topk.inputs[1])
    if k_arr is None or k_arr.size != 1:
        raise Refuse("k (TopK's second input) is not a constant")
    k = int(k_arr.flat[0])
    if attr(topk, "largest", 1) != 1:
        raise Refuse("TopK picks the smallest values")
    softmax = producer_is(logits, "Softmax")
    raw = softmax.inputs[0] if softmax is not None else logits
    if rank(raw) != 2:
        raise Refuse(f"router logits {raw.name!r} are not [T, E] (rank {rank(raw)})")
    if attr(topk, "axis", -1) not in (-1, 1) or (softmax is not None and attr(softmax, "axis", -1) not in (-1, 1)):
        raise Refuse("TopK/Softmax do not reduce over the expert axis")
    if raw.dtype not in ops.FLOAT_DTYPES:
        raise Refuse(f"router logits dtype {raw.dtype} is not float32/float16/bfloat16")
    num_experts = raw.shape[1]
    if not isinstance(num_experts, int):
        raise Refuse(f"the number of experts (dim 1 of {raw.name!r}) is not static")
    if not 1 <= k <= num_experts:
        raise Refuse(f"k={k} is outside [1, E={num_experts}]")
    values, indices = topk.outputs
    scatter = next((n for n in consumers(indices) if n.op_type == "ScatterElements"), None)
    if scatter is None or scatter.inputs[1] is not indices:
        raise Refuse("the top-k indices do not feed a ScatterElements")
    if attr(scatter, "axis", 0) not in (1, -1) or attr(scatter, "reduction", "none") not in ("none", b"none"):
        raise Refuse("the scatter is not a plain scatter along the expert axis")
    nodes = [topk, scatter]
    normalize = 0
    updates = scatter.inputs[2]
    if updates is not values:
        div = producer_is(updates, "Div")
        red = producer_is(div.inputs[1], "ReduceSum") if div is not None else None
        if div is None or red is None or div.inputs[0] is not values or red.inputs[0] is not values:
            raise Refuse("the scattered values are neither the top-k values nor their normalized form")
        axes = const_array(red.inputs[1]) if len(red.inputs) > 1 else None
        if axes is None or list(axes.reshape(-1)) not in ([-1], [1]) or attr(red, "keepdims", 1) != 1:
            raise Refuse("the top-k normalization does not sum over k")
        normalize = 1
        nodes += [red, div]
    fill, fill_nodes = _fill_constant(scatter.inputs[0])
    nodes += fill_nodes
    out = scatter.outputs[0]
    if softmax is None:
        if not (math.isinf(fill) and fill < 0):
            raise Refuse(f"the scatter fills with {fill}, expected -inf before a sigmoid")
        cast_in = next(iter(consumers(out)), None) if len(consumers(out)) == 1 else None
        if cast_in is not None and cast_in.op_type == "Cast":
            nodes.append(cast_in)
            out = cast_in.outputs[0]
        if len(consumers(out)) != 1 or consumers(out)[0].op_type != "Sigmoid":
            raise Refuse("the -inf scatter does not feed one Sigmoid")
        sigmoid = consumers(out)[0]
        nodes.append(sigmoid)
        out = sigmoid.outputs[0]
        score_function = "sigmoid"
        compute_dtype = out.dtype or raw.dtype
    else:
        if fill != 0.0:
            raise Refuse(f"the scatter fills with {fill}, expected 0 after a softmax")
        score_function = "softmax"
        compute_dtype = raw.dtype
    users = consumers(out)
    if len(users) == 1 and users[0].op_type == "Cast":
        nodes.append(users[0])
        out = users[0].outputs[0]
    check_private(nodes, [out])
    return dict(topk=topk, raw=raw, k=k, score_function=score_function, normalize=normalize,
                compute_dtype=compute_dtype, dense=out)


def _rewrite(graph: ir.Graph, m: dict, index: int) -> None:
    op = ops.OpBuilder()
    logits = m["raw"]
    if logits.dtype != m["compute_dtype"]:
        logits = op.Cast(logits, to=m["compute_dtype"])
        logits.dtype, logits.shape = m["compute_dtype"], m["raw"].shape
    ids, scores = ops.moe_gating(op, logits, k=m["k"], score_function=m["score_function"], normalize=m["normalize"])
    ids.dtype, scores.dtype = ir.DataType.INT64, m["compute_dtype"]
    dense_dtype = m["dense"].dtype or m["compute_dtype"]
    if dense_dtype != m["compute_dtype"]:
        scores = op.Cast(scores, to=dense_dtype)
    zeros = op.CastLike(op.ConstantOfShape(op.Shape(m["raw"])), scores)
    dense = op.ScatterElements(zeros, ids, scores, axis=1)
    name_new_nodes(op.nodes, f"moe_gating_{index}")
    insert_and_replace(graph, m["topk"], op.nodes, [m["dense"]], [dense])


def fuse_moe_gating(model: ir.Model, log: FusionLog | None = None) -> int:
    """Fuse every router top-k subgraph; returns the number fused. Refusals go to ``log``."""
    count = 0
    for topk in [n for n in model.graph if n.op_type == "TopK" and n.domain in ("", "ai.onnx")]:
        try:
            m = _match(topk)
        except Refuse as e:
            if log is not None:
                log.refuse(NAME, topk, str(e))
            continue
        _rewrite(model.graph, m, count)
        count += 1
    if count:
        remove_dead(model)
        ops.attach_functions(model)
    return count
