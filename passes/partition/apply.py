"""The one pass that applies a ``PartitionPlan`` for one rank, in place.

1. Weights: every sharded initializer becomes its rank's slice, computed lazily (a LazyTensor
   over the source, read only while the rank file is written, as the lowerings' relaid weights).
2. Heads: in each attention layer's head region (from the q/k/v projection outputs forward to
   the o projection, and from the past KV inputs) the head counts shrink by tp: the head entry of
   every Reshape/Expand shape (a new constant; shared shape constants are left to their other
   users), RotaryEmbedding's and Attention's head attributes, and the KV cache's axis 1.
   The head entry of a shape: with the head dim D last, the first static entry > 1 before it
   ([B, S, N, D], [B, K, groups, T, D], [B, N, T, D]); otherwise the last entry, heads x D merged
   ([B, S, N*D]). Head counts are >= tp >= 2, so N*D never reads as D.
3. Experts (ep > 1): the router stays whole; the expert ids a rank's GroupedExperts sees are
   shifted to its experts, and a token routed elsewhere gets score 0 and id 0: with no biases its
   contribution is exactly 0, so the world all-reduce adds each token's own expert once.
4. Collectives: a DistCollective all-reduce after every value the plan names.
Shapes of intermediate values are cleared (their dtypes kept): the pipeline's shape inference at
the end types the rank graph again.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from moec.common import contract
from moec.common.errors import MoecError
from moec.passes.fusions._graph import const_array
from moec.passes.partition import collectives
from moec.passes.partition.plan import PartitionPlan, Shard

METADATA_KEY = contract.PARALLEL_METADATA_KEY


def apply_partition(model: ir.Model, plan: PartitionPlan, rank: int, partition_id: str = "") -> int:
    """Turn ``model`` into rank ``rank``'s graph; returns how many tensors and nodes it changed."""
    plan.mapping.check_rank(rank)
    graph = model.graph
    changed = 0
    for name, shards in plan.weights.items():
        if name not in graph.initializers:
            raise MoecError(f"partition: the plan splits {name!r}, which the graph does not have")
        _slice_initializer(graph.initializers[name], shards, plan, rank)
        changed += 1
    if plan.mapping.tp > 1:
        for attention in plan.attention:
            changed += _split_heads(graph, attention, plan)
    nodes = {n.name: n for n in graph}
    for node_name, num_experts in plan.local_experts:
        _keep_local_experts(graph, nodes[node_name], plan.mapping.experts(rank, num_experts))
        changed += 1
    values = _values_by_name(graph)
    for ar in plan.all_reduces:
        _insert_all_reduce(graph, values[ar.value], plan.mapping.world_size, plan.mapping.group(ar.by, rank), ar.name)
        changed += 1
    _clear_intermediate_shapes(graph)
    model.metadata_props[METADATA_KEY] = json.dumps(
        {"world_size": plan.mapping.world_size, "rank": rank, "tp": plan.mapping.tp, "ep": plan.mapping.ep,
         "partition_id": partition_id})
    return changed


def rank_metadata(model_proto_or_ir) -> dict | None:
    """The ``moec.parallel`` metadata of a rank graph (onnx-ir model or onnx ModelProto), or None."""
    props = model_proto_or_ir.metadata_props
    if isinstance(props, dict):
        text = props.get(METADATA_KEY)
    else:
        text = next((p.value for p in props if p.key == METADATA_KEY), None)
    return json.loads(text) if text else None


# --- weights -------------------------------------------------------------------------------------


def _slices(shape: tuple[int, ...], shards: tuple[Shard, ...], plan: PartitionPlan, rank: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """Per sharded axis: (axis, [(start, stop), ...]) kept by ``rank`` (two ranges for gate|up)."""
    out = []
    for s in shards:
        n = shape[s.axis]
        parts = plan.mapping.parts(s.by)
        if n % (parts * s.halves):
            raise MoecError(f"partition: axis {s.axis} of size {n} does not split into {parts} x {s.halves} parts")
        half = n // s.halves
        lo, hi = plan.mapping.slice_for(s.by, rank, half)
        out.append((s.axis, [(h * half + lo, h * half + hi) for h in range(s.halves)]))
    return out


def _slice_initializer(value: ir.Value, shards: tuple[Shard, ...], plan: PartitionPlan, rank: int) -> None:
    src = value.const_value
    shape = tuple(int(d) for d in src.shape)
    cuts = _slices(shape, shards, plan, rank)
    new_shape = list(shape)
    for axis, ranges in cuts:
        new_shape[axis] = sum(b - a for a, b in ranges)

    def compute():
        arr = src.numpy()
        for axis, ranges in cuts:
            arr = np.concatenate([np.take(arr, np.arange(a, b), axis=axis) for a, b in ranges], axis=axis)
        return ir.tensor(np.ascontiguousarray(arr), name=value.name)

    value.const_value = ir.LazyTensor(compute, dtype=src.dtype, shape=ir.Shape(new_shape), name=value.name)
    value.shape = ir.Shape(new_shape)


# --- heads -----------------------------------------------------------------------------------------


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for v in graph.initializers.values()})
    for node in graph:
        values.update({o.name: o for o in node.outputs})
    return values


def _head_region(graph: ir.Graph, attention, values: dict[str, ir.Value]) -> list[ir.Node]:
    region: dict[int, ir.Node] = {}
    queue = [values[n] for n in attention.starts + attention.cache_inputs]
    seen = set()
    while queue:
        v = queue.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for use in v.uses():
            node = use.node
            # Shape nodes read batch and lengths (never heads here) into the mask arithmetic,
            # which is no part of the head region.
            if node.name == attention.stop_node or node.op_type == "Shape" or id(node) in region:
                continue
            region[id(node)] = node
            queue += [o for o in node.outputs if o.dtype is None or o.dtype.is_floating_point()]
    order = {id(n): i for i, n in enumerate(graph)}
    return sorted(region.values(), key=lambda n: order.get(id(n), -1))


def _split_heads(graph: ir.Graph, attention, plan: PartitionPlan) -> int:
    tp = plan.mapping.tp
    values = _values_by_name(graph)
    changed = 0
    for name in attention.cache_inputs:
        v = values[name]
        _divide_axis1(v, tp)
    # The layer's presents: Concat(past, new) for a full cache, a Gather of that Concat for a
    # chunked layer's ring (not fed by the past directly), so found by name.
    presents = {contract.present_key(attention.layer), contract.present_value(attention.layer)}
    for out in graph.outputs:
        if out.name in presents:
            _divide_axis1(out, tp)
    for node in _head_region(graph, attention, values):
        if node.op_type in ("Reshape", "Expand") and node.domain in ("", "ai.onnx"):
            _rewrite_shape(graph, node, plan.head_dim, tp)
            changed += 1
        elif node.op_type == "RotaryEmbedding" and "num_heads" in node.attributes:
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", _divided(node.attributes.get_int("num_heads"), tp, node))
            changed += 1
        elif node.op_type == "Attention":
            for key in ("q_num_heads", "kv_num_heads"):
                if key in node.attributes:
                    node.attributes[key] = ir.AttrInt64(key, _divided(node.attributes.get_int(key), tp, node))
            changed += 1
    return changed


def _divide_axis1(v: ir.Value, tp: int) -> None:
    if v.shape is not None and len(v.shape) > 1 and isinstance(v.shape[1], int):
        dims = list(v.shape)
        dims[1] = dims[1] // tp
        v.shape = ir.Shape(dims)


def _divided(n: int, tp: int, node: ir.Node) -> int:
    if n % tp:
        raise MoecError(f"partition: node {node.name!r} has {n} heads, which tp {tp} does not divide")
    return n // tp


def _head_index(entries: list[int | None], head_dim: int, node: ir.Node) -> int:
    static = [i for i, e in enumerate(entries) if e is not None and e > 1]
    if not static:
        raise MoecError(f"partition: the shape of {node.op_type} node {node.name!r} has no static head entry")
    last = len(entries) - 1
    if entries[last] == head_dim:
        before = [i for i in static if i < last]
        if before:
            return before[0]
    if entries[last] is None:
        raise MoecError(f"partition: cannot find the head entry in the shape of {node.op_type} node {node.name!r}")
    return last


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                 const_value=ir.tensor(array, name=name))
    graph.register_initializer(v)
    return v


def _rewrite_shape(graph: ir.Graph, node: ir.Node, head_dim: int, tp: int) -> None:
    shape_v = node.inputs[1]
    arr = const_array(shape_v)
    if arr is not None:
        entries = [int(x) for x in arr.reshape(-1)]
        i = _head_index(entries, head_dim, node)
        entries[i] = _divided(entries[i], tp, node)
        node.replace_input_with(1, _const(graph, f"{node.name}/rank_shape", np.array(entries, dtype=arr.dtype)))
        return
    concat = shape_v.producer()
    if concat is None or concat.op_type != "Concat":
        raise MoecError(f"partition: the shape of {node.op_type} node {node.name!r} is neither a constant nor a Concat")
    pieces, entries = [], []
    for inp in concat.inputs:
        a = const_array(inp)
        if a is not None:
            pieces.append((inp, a.reshape(-1)))
            entries += [int(x) for x in a.reshape(-1)]
            continue
        length = inp.shape[0] if inp.shape is not None and len(inp.shape) == 1 else None
        if not isinstance(length, int):
            raise MoecError(f"partition: a part of the shape of {node.op_type} node {node.name!r} has no static length")
        pieces.append((inp, None))
        entries += [None] * length
    i = _head_index(entries, head_dim, node)
    start = 0
    new_inputs = []
    for inp, a in pieces:
        n = len(a) if a is not None else (inp.shape[0])
        if a is not None and start <= i < start + n:
            b = a.copy()
            b[i - start] = _divided(int(b[i - start]), tp, node)
            inp = _const(graph, f"{node.name}/rank_shape_part", b)
        new_inputs.append(inp)
        start += n
    out = ir.Value(name=f"{node.name}/rank_shape", type=shape_v.type, shape=shape_v.shape)
    new = ir.Node("", "Concat", new_inputs, [ir.AttrInt64("axis", 0)], outputs=[out], name=f"{node.name}/rank_shape_concat")
    graph.insert_before(node, new)
    node.replace_input_with(1, out)


# --- experts and collectives -----------------------------------------------------------------------


def _keep_local_experts(graph: ir.Graph, node: ir.Node, experts: tuple[int, int]) -> None:
    ids, scores = node.inputs[1], node.inputs[2]
    lo, hi = experts
    id_np = ids.dtype.numpy() if ids.dtype is not None else np.int64
    s_np = scores.dtype.numpy() if scores.dtype is not None else np.float32
    lo_c = _const(graph, f"{node.name}/first_local_expert", np.array(lo, dtype=id_np))
    hi_c = _const(graph, f"{node.name}/end_local_expert", np.array(hi, dtype=id_np))
    zero_id = _const(graph, f"{node.name}/zero_id", np.array(0, dtype=id_np))
    zero_s = _const(graph, f"{node.name}/zero_score", np.array(0, dtype=s_np))
    p = f"{node.name}/local"
    mk = lambda op, ins, dtype: ir.Node("", op, ins, outputs=[ir.Value(name=f"{p}_{op.lower()}_{len(ins)}_{dtype}", type=ir.TensorType(dtype))], name=f"{p}/{op}")
    ge = mk("GreaterOrEqual", [ids, lo_c], ir.DataType.BOOL)
    lt = mk("Less", [ids, hi_c], ir.DataType.BOOL)
    mask = mk("And", [ge.outputs[0], lt.outputs[0]], ir.DataType.BOOL)
    shifted = mk("Sub", [ids, lo_c], ids.dtype or ir.DataType.INT64)
    local_ids = ir.Node("", "Where", [mask.outputs[0], shifted.outputs[0], zero_id],
                        outputs=[ir.Value(name=f"{p}_ids_TK", type=ids.type)], name=f"{p}/ids")
    local_scores = ir.Node("", "Where", [mask.outputs[0], scores, zero_s],
                           outputs=[ir.Value(name=f"{p}_scores_TK", type=scores.type)], name=f"{p}/scores")
    for n in (ge, lt, mask, shifted, local_ids, local_scores):
        graph.insert_before(node, n)
    node.replace_input_with(1, local_ids.outputs[0])
    node.replace_input_with(2, local_scores.outputs[0])


def _insert_all_reduce(graph: ir.Graph, value: ir.Value, world_size: int, group, name: str) -> None:
    uses = list(value.uses())
    node = collectives.make_all_reduce(value, world_size=world_size, group=group, name=name)
    producer = value.producer()
    if producer is None:
        raise MoecError(f"partition: {value.name!r} is not computed by a node; nothing to all-reduce")
    graph.insert_after(producer, node)
    for use in uses:
        use.node.replace_input_with(use.idx, node.outputs[0])
    for i, out in enumerate(graph.outputs):
        if out is value:
            raise MoecError(f"partition: graph output {value.name!r} would need an all-reduce")


def _clear_intermediate_shapes(graph: ir.Graph) -> None:
    keep = {id(v) for v in graph.outputs}
    for node in graph:
        if collectives.is_collective(node):
            continue
        for o in node.outputs:
            if id(o) not in keep:
                o.shape = None
