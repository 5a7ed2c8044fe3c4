"""split: every expert as its own pair of weights, run by plain MatMuls (ONNX Runtime).

ONNX Runtime 1.32's CPU com.microsoft.MoE runs a one-token step on one thread; ORT's MatMul uses
every intra-op thread. Splitting the stacked [E, H, 2I] / [E, I, H] weights into E initializers
lets each step read only the chosen experts, once, with no gather copy of an expert matrix: for
each expert in turn, the tokens routed to it are gathered (NonZero / GatherND), run through its
two MatMuls and scattered back with ScatterND(add). A one-token step runs the chosen expert on
one row and the others on zero rows.

Measured (benchmarks/results/ort_moe_layer_forms_H1024_t2_r2.md, ort_split_h1024.md): one
H1024 I2048 E16 layer, 2 threads: 1.22 ms a token against com.microsoft.MoE's 1.94, 20 ms
against 38 for 64 tokens; the h1024 model decodes 18 % faster than with com.microsoft.MoE
(20.4 vs 24.9 ms a step, benchmarks/results/ort_split_h1024.md).

Why no If: an If on "some token chose it" around each group, or a tree of Ifs on the expert id
for one token (the form before), puts the MatMuls in subgraphs. ONNX Runtime prepacks a constant
MatMul weight once per consuming node and, for a subgraph's outer-scope weight, keeps the
original as well: the tree plus the groups held the experts twice (6.58 GB against 3.67 at
h1024), and even one If per group costs as much per expert as the empty group it skips.

That per-expert cost, about 7-8 µs per one-token step (E 128, H 512: 1.42 ms a layer against
com.microsoft.MoE's 0.54, ort_moe_layer_forms_H512_E128_t2.md), is why the ``ort`` target takes
split by default only up to
``DEFAULT_MAX_EXPERTS`` experts; ``--moe-lowering split`` takes it for any E.
"""

from __future__ import annotations

import onnx_ir as ir

from moec.passes import ops
from moec.passes.fusions._graph import Refuse
from moec.passes.lowerings._weights import derived, dims
from moec.passes.lowerings.ort_quant import dequantized

DEFAULT_MAX_EXPERTS = 32


def default_refusal(pair) -> str | None:
    """Why the ``ort`` target's default should not take split for this layer (None: take it)."""
    E = dims(pair)[0]
    if E > DEFAULT_MAX_EXPERTS:
        return (f"{E} experts: each costs split about 8 us per one-token step, so com.microsoft.MoE is faster "
                f"above {DEFAULT_MAX_EXPERTS} (--moe-lowering split takes it anyway)")
    return None


def lower(op, pair):
    for w in (pair.w_gate_up_EHI2, pair.w_down_EIH):
        if dequantized(w) is not None:
            raise Refuse(f"quantized experts ({w.name} is dequantized): split multiplies float initializers; "
                         "com.microsoft.QMoE reads the packed weights")
    ids, scores = pair.ids_TK, pair.scores_TK
    if pair.gating is not None:
        ids, scores = ops.build_gating(op, pair.logits_TE, **pair.gating_attrs)
    graph = pair.experts.graph
    E, H, I = dims(pair)
    k, on_input, dtype = pair.experts_attrs["k"], pair.experts_attrs["score_on_input"], pair.x_TH.dtype
    s_TK = op.Cast(scores, to=dtype)
    ids_TK = op.Cast(ids, to=ir.DataType.INT64)
    x_TH = pair.x_TH
    if k == 1:
        # One choice a token: its score can scale the whole row once, and the rows routed to an
        # expert are the NonZero of a 1-D mask, already GatherND's [N, 1] after a Transpose.
        ids_T = op.Squeeze(ids_TK, op.Constant(value_ints=[1]))
        if on_input:
            x_TH = op.Mul(x_TH, s_TK)
    out_TH = op.Cast(op.ConstantOfShape(op.Shape(pair.x_TH)), to=dtype)
    for e in range(E):
        w_gu = derived(graph, pair.w_gate_up_EHI2, f"split{e}_HI2", (H, 2 * I), lambda w, e=e: w[e])
        w_d = derived(graph, pair.w_down_EIH, f"split{e}_IH", (I, H), lambda w, e=e: w[e])
        if k == 1:
            t_N1 = op.Transpose(op.NonZero(op.Equal(ids_T, op.Constant(value_int=e))), perm=[1, 0])
            y_NH = _ffn(op, op.GatherND(x_TH, t_N1), w_gu, w_d)
            if not on_input:
                y_NH = op.Mul(y_NH, op.GatherND(s_TK, t_N1))
        else:
            tk_N2 = op.Transpose(op.NonZero(op.Equal(ids_TK, op.Constant(value_int=e))), perm=[1, 0])
            t_N1 = op.Slice(tk_N2, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[1]))
            s_N1 = op.Unsqueeze(op.GatherND(s_TK, tk_N2), op.Constant(value_ints=[1]))
            x_NH = op.GatherND(x_TH, t_N1)
            y_NH = _ffn(op, op.Mul(x_NH, s_N1) if on_input else x_NH, w_gu, w_d)
            if not on_input:
                y_NH = op.Mul(y_NH, s_N1)
        # An expert appears at most once among a token's K choices, so the indices within one
        # ScatterND are distinct; "add" accumulates a token's K experts across the chain.
        out_TH = op.ScatterND(out_TH, t_N1, y_NH, reduction="add")
    return out_TH


def _ffn(op, x_NH, w_gu_HI2, w_d_IH):
    return op.MatMul(ops._swiglu(op, op.MatMul(x_NH, w_gu_HI2)), w_d_IH)
