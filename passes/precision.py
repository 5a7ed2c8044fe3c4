"""convert_precision: an fp32 graph -> fp16 or bf16 weights and activations.

Kept in fp32:
- the routing: moec.MoEGating's input is cast to fp32, its scores stay fp32 (GroupedExperts casts
  them to the hidden dtype where it multiplies), so top-k and the sigmoid see fp32 logits;
- positional arithmetic: every float computed from integers (a Cast of position ids, then RoPE
  angles, temperature tuning) up to the point where it meets an activation. fp16 has 11 bits of
  mantissa: a rotary angle of 500 rad would be off by a quarter radian.
- the graph's inputs and outputs (KV cache, logits) keep their fp32 types, with casts at the
  boundary, so the runtime contract (sidecar "dtype", fp32 logits) does not change.

Why hand-written: onnxconverter-common / onnxruntime.transformers' float16 converters work on a
ModelProto with every weight in memory (no lazy external data), know nothing of moec ops and do not
do bf16. The rule here is small: choose a dtype per value, then insert a Cast on every edge whose
producer and consumer disagree. Weights are converted lazily, while the model is written.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.common.contract import MOEC_DOMAIN, OP_GROUPED_EXPERTS, OP_MOE_GATING
from moec.common.errors import MoecError

LOW_DTYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
F32 = ir.DataType.FLOAT
_INT_DTYPES = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.BOOL,
               ir.DataType.INT16}
# Ops whose output dtype is not their first input's (for values the exporters left untyped).
_OUTPUT_DTYPE = {"Shape": ir.DataType.INT64, "Size": ir.DataType.INT64, "NonZero": ir.DataType.INT64,
                 "ArgMax": ir.DataType.INT64, "ArgMin": ir.DataType.INT64, "Equal": ir.DataType.BOOL,
                 "Less": ir.DataType.BOOL, "Greater": ir.DataType.BOOL, "LessOrEqual": ir.DataType.BOOL,
                 "GreaterOrEqual": ir.DataType.BOOL, "Not": ir.DataType.BOOL, "And": ir.DataType.BOOL,
                 "Or": ir.DataType.BOOL}


def _infer_missing_dtypes(graph: ir.Graph) -> None:
    for node in graph:
        for i, out in enumerate(node.outputs):
            if out.dtype is not None:
                continue
            if node.op_type == "Cast":
                out.dtype = ir.DataType(node.attributes["to"].value)
            elif node.op_type in _OUTPUT_DTYPE:
                out.dtype = _OUTPUT_DTYPE[node.op_type]
            elif node.op_type == "TopK" and i == 1:
                out.dtype = ir.DataType.INT64
            elif node.op_type in ("Where",):
                out.dtype = node.inputs[1].dtype
            elif node.op_type in ("ConstantOfShape",):
                t = node.attributes.get("value")
                out.dtype = t.value.dtype if t is not None else F32
            else:
                known = [v.dtype for v in node.inputs if v is not None and v.dtype is not None]
                if known:
                    out.dtype = known[0]


def _is_const(value: ir.Value) -> bool:
    if value.const_value is not None:
        return True
    p = value.producer()
    return p is not None and p.op_type == "Constant"


def _float_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.dtype == F32]


def _positional_fp32_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Nodes computing floats from integers only (with constants): they stay fp32."""
    keep: set[ir.Node] = set()
    for node in graph:  # topological order
        if node.domain not in ("", "ai.onnx"):
            continue
        outs = [o for o in node.outputs if o.dtype == F32]
        if not outs:
            continue
        if node.op_type == "Cast" and node.inputs[0].dtype in _INT_DTYPES:
            keep.add(node)
            continue
        floats = _float_inputs(node)
        from_keep = [v for v in floats if v.producer() in keep]
        if from_keep and all(v.producer() in keep or _is_const(v) for v in floats):
            keep.add(node)
    return keep


def _finite_max(low: ir.DataType) -> float:
    import ml_dtypes  # an onnx-ir dependency; numpy has no bfloat16

    return float(ml_dtypes.finfo(ml_dtypes.bfloat16).max if low == ir.DataType.BFLOAT16 else np.finfo(np.float16).max)


def _overflows(tensor: ir.TensorProtocol, low: ir.DataType) -> bool:
    """Finite values the low dtype cannot hold (they would round to +-inf). Only small constants
    are checked: weights are never near fp16's 65504, and reading them here would load them."""
    if tensor.nbytes > 4096:
        return False
    arr = tensor.numpy()
    return bool(np.any(np.isfinite(arr) & (np.abs(arr) > _finite_max(low))))


def _is_mask_fill(value: ir.Value) -> bool:
    """Only used as a Where branch: "as negative as the dtype allows", a fill, not arithmetic."""
    uses = list(value.uses())
    return bool(uses) and all(u.node.op_type == "Where" and u.idx in (1, 2) for u in uses)


def _low_tensor(tensor: ir.TensorProtocol, low: ir.DataType, saturate: bool = False) -> ir.TensorProtocol:
    def convert():
        arr = tensor.numpy().astype(np.float32)
        if saturate:
            # A mask fill of float32 min (models/llama4.py attention_masks uses finfo(dtype).min) would
            # round to -inf: clamp it to the low dtype's finite min, which is what an export in that
            # dtype writes, so masked scores stay finite and the softmax gives them exactly 0.
            big = _finite_max(low)
            arr = np.where(np.isfinite(arr), np.clip(arr, -big, big), arr)
        if low == ir.DataType.BFLOAT16:
            import ml_dtypes  # an onnx-ir dependency; numpy has no bfloat16

            return ir.tensor(arr.astype(ml_dtypes.bfloat16), dtype=low)
        return ir.tensor(arr.astype(np.float16))

    return ir.LazyTensor(convert, dtype=low, shape=tensor.shape)


def convert_precision(model: ir.Model, precision: str) -> int:
    """Convert ``model`` in place; returns how many tensors and nodes changed dtype."""
    if precision not in LOW_DTYPES:
        raise MoecError(f"precision {precision!r}: choose fp16 or bf16 (fp32 is the export's own)")
    low = LOW_DTYPES[precision]
    graph = model.graph
    if any(v.dtype in LOW_DTYPES.values() for v in graph.initializers.values()):
        raise MoecError("the model already has fp16/bf16 weights; --precision converts fp32 exports only")
    _infer_missing_dtypes(graph)
    keep = _positional_fp32_nodes(graph)
    changed = 0

    # 0. Constants the low dtype cannot hold: a mask fill is clamped (saturated) to its finite range;
    # anything else keeps fp32 and so do its consumers, since rounding it to inf would change the
    # arithmetic (inf - inf = NaN), not just its precision.
    saturate: set[int] = set()
    for value in [*graph.initializers.values(), *(n.outputs[0] for n in graph if n.op_type == "Constant")]:
        tensor = value.const_value if value.const_value is not None else value.producer().attributes["value"].value
        if value.dtype != F32 or tensor is None or not _overflows(tensor, low):
            continue
        if _is_mask_fill(value):
            saturate.add(id(tensor))
        else:
            keep.update(u.node for u in value.uses())

    # 1. Values: everything fp32 that is not positional becomes low.
    boundary_in = [v for v in graph.inputs if v.dtype == F32]
    boundary_out = {v for v in graph.outputs if v.dtype == F32}
    for value in graph.initializers.values():
        if value.dtype == F32 and not all(u.node in keep for u in value.uses()):
            value.const_value = _low_tensor(value.const_value, low, id(value.const_value) in saturate)
            value.dtype = low
            changed += 1
    for node in list(graph):
        if node in keep:
            continue
        if node.domain == MOEC_DOMAIN and node.op_type == OP_MOE_GATING:
            continue  # its scores stay fp32
        if node.op_type == "Constant" and node.outputs[0].dtype == F32:
            t = node.attributes["value"].value
            node.attributes["value"] = ir.AttrTensor("value", _low_tensor(t, low, id(t) in saturate))
        elif node.op_type == "Cast" and node.attributes["to"].value == F32:
            node.attributes["to"] = ir.AttrInt64("to", low)
        elif node.op_type == "ConstantOfShape" and node.outputs[0].dtype == F32:
            t = node.attributes.get("value")
            base = t.value if t is not None else ir.tensor(np.zeros(1, np.float32))
            node.attributes["value"] = ir.AttrTensor("value", _low_tensor(base, low))
        elif node.op_type in ("RandomNormal", "RandomUniform", "EyeLike", "RandomNormalLike", "RandomUniformLike"):
            raise MoecError(f"node {node.name!r}: {node.op_type} has a dtype attribute --precision does not convert")
        for out in node.outputs:
            if out.dtype == F32:
                out.dtype = low
                changed += 1

    # 2. Boundaries: fp32 graph inputs are cast down once; fp32 graph outputs are cast back up.
    for value in boundary_in:
        users = [u for u in value.uses() if u.node not in keep]
        if not users:
            continue
        cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", low)], name=f"{value.name}/to_{precision}")
        cast.outputs[0].name, cast.outputs[0].dtype = f"{value.name}.{precision}", low
        graph.insert_before(next(iter(graph)), cast)
        for u in users:
            u.node.replace_input_with(u.idx, cast.outputs[0])
    for i, value in enumerate(list(graph.outputs)):
        if value in boundary_out and value.dtype == low:
            cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", F32)], name=f"{value.name}/to_fp32")
            out = cast.outputs[0]
            out.dtype, out.shape = F32, value.shape
            name = value.name
            value.name = f"{name}.{precision}"
            out.name = name
            graph.append(cast)
            graph.outputs[i] = out

    # 3. Edges whose producer and consumer now disagree get a Cast.
    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    for node in list(graph):
        if node.domain == MOEC_DOMAIN and node.op_type == OP_MOE_GATING:
            want = F32
        elif node in keep:
            want = F32
        elif node.op_type == "Cast" and node.inputs[0].dtype in (F32, low):
            continue  # a Cast takes either
        else:
            want = low
        for idx, value in enumerate(node.inputs):
            if value is None or value.dtype not in (F32, low) or value.dtype == want:
                continue
            if node.domain == MOEC_DOMAIN and node.op_type == OP_GROUPED_EXPERTS and idx == 2:
                continue  # scores may stay fp32 (schema)
            if node.op_type in ("Shape", "Size"):
                continue
            key = (value, want)
            if key not in casts:
                cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", want)],
                               name=f"{value.name}/cast_{'fp32' if want == F32 else precision}_{len(casts)}")
                cast.outputs[0].name, cast.outputs[0].dtype = cast.name + "_out", want
                graph.insert_before(node, cast)
                casts[key] = cast.outputs[0]
                changed += 1
            node.replace_input_with(idx, casts[key])
    return changed
