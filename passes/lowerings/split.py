"""split: every expert as its own pair of weights, run by plain MatMuls (ONNX Runtime).

ONNX Runtime 1.32's CPU com.microsoft.MoE runs a one-token step on one thread; ORT's MatMul uses
every intra-op thread. Splitting the stacked [E, H, 2I] / [E, I, H] weights into E initializers
lets each phase read only what it needs, once, with no gather copy of an expert matrix:
- one token (decode at batch 1; T == 1): for each of the K choices, a binary tree of Ifs on the
  expert id (depth ceil(log2 E)) reaches the branch that multiplies by that expert's own weights;
- more tokens (prefill, batched decode): for each expert, the tokens routed to it (NonZero of
  ids == e) are gathered, run through its MatMuls and scattered back with ScatterND(add).
One If on T picks the phase. Both phases share the same E weight pairs, so the model holds each
expert once (the stacked originals are dropped as dead).
Measured on an overloaded shared host (benchmarks/results/ort_moe_layer_forms_*.md,
ort_vs_llamacpp_h512*.md): prefill faster than com.microsoft.MoE (one layer 2-5x by the minima,
the h512 model 1.5x at 1 thread), decode about equal; not yet the ``ort`` default (see there).
"""

from __future__ import annotations

import onnx_ir as ir

from moec.passes import ops
from moec.passes.lowerings._weights import derived, dims


def lower(op, pair):
    ids, scores = pair.ids_TK, pair.scores_TK
    if pair.gating is not None:
        ids, scores = ops.build_gating(op, pair.logits_TE, **pair.gating_attrs)
    graph = pair.experts.graph
    E, H, I = dims(pair)
    weights = [
        (derived(graph, pair.w_gate_up_EHI2, f"split{e}_HI2", (H, 2 * I), lambda w, e=e: w[e]),
         derived(graph, pair.w_down_EIH, f"split{e}_IH", (I, H), lambda w, e=e: w[e]))
        for e in range(E)
    ]
    k, on_input, dtype = pair.experts_attrs["k"], pair.experts_attrs["score_on_input"], pair.x_TH.dtype
    name = f"{pair.experts.name}/split"
    one = _subgraph(lambda sub: _one_token(sub, pair.x_TH, ids, scores, weights, k, on_input, dtype, name),
                    f"{name}/one_token", dtype)
    many = _subgraph(lambda sub: _by_expert(sub, pair.x_TH, ids, scores, weights, on_input, dtype),
                     f"{name}/by_expert", dtype)
    is_one = op.Squeeze(op.Equal(op.Shape(pair.x_TH, start=0, end=1), op.Constant(value_ints=[1])))
    return op.If(is_one, then_branch=one, else_branch=many)


def _ffn(op, x_NH, w_gu_HI2, w_d_IH):
    return op.MatMul(ops._swiglu(op, op.MatMul(x_NH, w_gu_HI2)), w_d_IH)


def _one_token(op, x_1H, ids_1K, scores_1K, weights, k, on_input, dtype, name):
    s_1K = op.Cast(scores_1K, to=dtype)
    ids_K = op.Squeeze(op.Cast(ids_1K, to=ir.DataType.INT64), op.Constant(value_ints=[0]))
    out_1H = None
    for j in range(k):
        id_j = op.Gather(ids_K, op.Constant(value_int=j), axis=0)  # a scalar
        s_11 = op.Gather(s_1K, op.Constant(value_ints=[j]), axis=1)
        h_1H = op.Mul(x_1H, s_11) if on_input else x_1H
        y_1H = _tree(op, id_j, h_1H, weights, 0, len(weights), f"{name}/k{j}", dtype)
        if not on_input:
            y_1H = op.Mul(y_1H, s_11)
        out_1H = y_1H if out_1H is None else op.Add(out_1H, y_1H)
    return out_1H


def _tree(op, id_, h_1H, weights, lo, hi, name, dtype):
    """The expert ``id_`` in [lo, hi) applied to h_1H: nested Ifs halving the range."""
    if hi - lo == 1:
        return _ffn(op, h_1H, *weights[lo])
    mid = (lo + hi) // 2
    low = _subgraph(lambda sub: _tree(sub, id_, h_1H, weights, lo, mid, f"{name}/{lo}", dtype),
                    f"{name}/{lo}_{mid}", dtype)
    high = _subgraph(lambda sub: _tree(sub, id_, h_1H, weights, mid, hi, f"{name}/{mid}", dtype),
                     f"{name}/{mid}_{hi}", dtype)
    return op.If(op.Less(id_, op.Constant(value_int=mid)), then_branch=low, else_branch=high)


def _by_expert(op, x_TH, ids_TK, scores_TK, weights, on_input, dtype):
    s_TK = op.Cast(scores_TK, to=dtype)
    ids_TK = op.Cast(ids_TK, to=ir.DataType.INT64)
    out_TH = op.Cast(op.ConstantOfShape(op.Shape(x_TH)), to=dtype)
    for e, (w_gu, w_d) in enumerate(weights):
        tk_N2 = op.Transpose(op.NonZero(op.Equal(ids_TK, op.Constant(value_int=e))), perm=[1, 0])
        t_N1 = op.Slice(tk_N2, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[1]))
        x_NH = op.GatherND(x_TH, t_N1)
        s_N1 = op.Unsqueeze(op.GatherND(s_TK, tk_N2), op.Constant(value_ints=[1]))
        y_NH = _ffn(op, op.Mul(x_NH, s_N1) if on_input else x_NH, w_gu, w_d)
        if not on_input:
            y_NH = op.Mul(y_NH, s_N1)
        # Each expert appears at most once among a token's K choices, so indices within one
        # ScatterND are distinct; "add" accumulates a token's K experts across the chain.
        out_TH = op.ScatterND(out_TH, t_N1, y_NH, reduction="add")
    return out_TH


def _subgraph(build, name: str, dtype: ir.DataType) -> ir.Graph:
    sub = ops.OpBuilder()
    y = sub.Identity(build(sub))
    y.dtype = dtype
    for i, node in enumerate(sub.nodes):
        node.name = f"{name}/{node.op_type}_{i}"
        for j, v in enumerate(node.outputs):
            v.name = v.name or f"{node.name}_{j}"
    return ir.Graph([], [y], nodes=sub.nodes, name=name.replace("/", "_"))
