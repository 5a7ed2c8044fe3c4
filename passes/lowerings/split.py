"""split: every expert as its own pair of weights, run by plain MatMuls (ONNX Runtime).

ONNX Runtime 1.32's CPU com.microsoft.MoE runs a one-token step on one thread; ORT's MatMul uses
every intra-op thread. Splitting the stacked [E, H, 2I] / [E, I, H] weights into E initializers
lets each step read only the chosen experts, once, with no gather copy of an expert matrix. Once a
layer the (token, choice) pairs are sorted by expert (TopK) and gathered, so each expert's rows are
one contiguous range, and one Split by the per-expert counts cuts them apart. Per expert there are
then only its two MatMuls: the gate-up rows of all experts are concatenated back for one SwiGLU a
layer and cut again for the down MatMuls; one Concat and a Gather by the inverse order put the
rows back. A one-token step runs the chosen expert on one row and the others on zero rows (a
zero-row MatMul reads no weight, but costs ORT about 1.3 us a node at decode).

Every node runs every step, rows or not, so the nodes per expert are what this form saves: the
first form (per expert Equal / NonZero / Transpose / GatherND ... ScatterND(add), ten nodes) cost
2.0 ms more a decode step at h1024 than six (27.1 against 25.1 ms,
benchmarks/results/ort_decode_settings_h1024.md); the sorted-slices form (a Slice, two MatMuls and
a SwiGLU per expert) cost 5.6 us per zero-row expert against 3.5 in this one.

Measured (benchmarks/results/ort_moe_layer_forms_H1024_t2_r2.md, ort_split_h1024.md): one
H1024 I2048 E16 layer, 2 threads: 1.22 ms a token against com.microsoft.MoE's 1.94, 20 ms
against 38 for 64 tokens; the h1024 model decodes 18 % faster than with com.microsoft.MoE
(20.4 vs 24.9 ms a step, benchmarks/results/ort_split_h1024.md).

int4 experts (the quantize pass's blockwise DequantizeLinear) become one com.microsoft.MatMulNBits
pair per expert, which reads the packed weights on every intra-op thread; with
``--quantize-activations dynamic`` (accuracy_level 4) it computes with int8 activations, which
com.microsoft.QMoE cannot. int8 experts are left to QMoE: 8-bit MatMulNBits with float activations
is slower than fp32 here (benchmarks/results/quant_decode_speed_split.md).

Why no If: an If on "some token chose it" around each group, or a tree of Ifs on the expert id
for one token (the form before), puts the MatMuls in subgraphs. ONNX Runtime prepacks a constant
MatMul weight once per consuming node and, for a subgraph's outer-scope weight, keeps the
original as well: the tree plus the groups held the experts twice (6.58 GB against 3.67 at
h1024), and even one If per group costs as much per expert as the empty group it skips.

That per-expert cost (two zero-row MatMuls per one-token step) is why the ``ort`` target takes
split by default only up to ``DEFAULT_MAX_EXPERTS`` experts: at E 128, H 512 one layer's step is
0.284 ms against com.microsoft.MoE's 0.253 (0.506 in the slices form;
ort_moe_layer_forms_H512_E128_t2_cuts.md), 0.269 against 0.219 for the ``ort`` lowering's two slices
an expert (ort_moe_layer_forms_H512_E128_t2_parts.md). ``--moe-lowering split`` takes it for any E.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.passes import ops
from moec.passes.fusions._graph import Refuse
from moec.passes.lowerings._weights import derived, dims
from moec.passes.lowerings.ort_quant import (ORT_DOMAIN, dequantized, matmul_nbits_expert, nbits_expert_refusal,
                                             quantized_experts)

DEFAULT_MAX_EXPERTS = 32


def default_refusal(pair) -> str | None:
    """Why the ``ort`` target's default should not take split for this layer (None: take it)."""
    E = dims(pair)[0]
    gu = dequantized(pair.w_gate_up_EHI2)
    if gu is not None and gu.dynamic:
        return None  # int8 activations: only MatMulNBits computes them (QMoE has no such mode)
    if E > DEFAULT_MAX_EXPERTS:
        return (f"{E} experts: each costs split two zero-row MatMuls per one-token step, so the default "
                f"keeps com.microsoft.MoE above {DEFAULT_MAX_EXPERTS} (1.2x faster at 128; --moe-lowering split "
                "takes split anyway)")
    return None


def lower(op, pair):
    quantized = quantized_experts(pair)
    if quantized is not None:
        for d in quantized:
            if (reason := nbits_expert_refusal(d)) is not None:
                raise Refuse(reason)
            if d.scale.dtype != pair.x_TH.dtype:
                raise Refuse(f"{d.scale.name} is {d.scale.dtype}, the hidden state {pair.x_TH.dtype}; MatMulNBits "
                             "takes its scales in the input's dtype")
    ids, scores = pair.ids_TK, pair.scores_TK
    if pair.gating is not None:
        ids, scores = ops.build_gating(op, pair.logits_TE, **pair.gating_attrs)
    graph = pair.experts.graph
    E, H, I = dims(pair)
    k, on_input, dtype = pair.experts_attrs["k"], pair.experts_attrs["score_on_input"], pair.x_TH.dtype
    flat = op.Constant(value_ints=[-1])
    # P = T*K (token, choice) pairs, p = t*K + k, sorted by expert once a layer: each expert's rows
    # are then one contiguous range of the sorted rows. TopK sorts the int64 ids directly; the order
    # among equal ids does not matter, it is undone by the same order. Every node here runs every
    # step (about 1.3 us each at decode, once the weights have flushed the caches), so k = 1 takes
    # the shortest form: the score multiplies the tokens before the sort, and the [T, 1] ids
    # compare with the expert ids as they are.
    ids_TK = op.Cast(ids, to=ir.DataType.INT64)
    ids_P = op.Reshape(ids_TK, flat)
    n_P = op.Shape(ids_P)
    _, order_P = op.TopK(ids_P, n_P, largest=0, sorted=1, _outputs=2)
    s_TK = op.Cast(scores, to=dtype)
    if k == 1:
        x_PH = op.Gather(op.Mul(pair.x_TH, s_TK) if on_input else pair.x_TH, order_P, axis=0)
    else:
        tok_P = op.Div(order_P, op.Constant(value=ir.tensor(np.array(k, np.int64))))
        x_PH = op.Gather(pair.x_TH, tok_P, axis=0)
        if on_input:
            x_PH = op.Mul(x_PH, op.Unsqueeze(op.Gather(op.Reshape(s_TK, flat), order_P, axis=0),
                                             op.Constant(value_ints=[1])))
    # n_E[e] = how many pairs chose expert e; one Split by n_E cuts the sorted rows into each
    # expert's contiguous range (a [0, H] range for an expert no pair chose).
    ids_P1 = ids_TK if k == 1 else op.Reshape(ids_TK, op.Constant(value_ints=[-1, 1]))
    n_E = op.ReduceSum(op.Cast(op.Equal(ids_P1, op.Constant(value=ir.tensor(np.arange(E, dtype=np.int64)[None, :]))),
                               to=ir.DataType.INT64),
                       op.Constant(value_ints=[0]), keepdims=0)
    x_EnH = op.Split(x_PH, n_E, axis=0, _outputs=E)
    # Per expert only its two MatMuls: the gate-up rows of all experts are concatenated back into
    # sorted order for one SwiGLU a layer, then split again for the down MatMuls. At one token the
    # 15 unchosen experts cost two zero-row MatMuls each (they read no weight) instead of six nodes.
    if quantized is None:
        w_gu = [derived(graph, pair.w_gate_up_EHI2, f"split{e}_HI2", (H, 2 * I), lambda w, e=e: w[e]) for e in range(E)]
        w_d = [derived(graph, pair.w_down_EIH, f"split{e}_IH", (I, H), lambda w, e=e: w[e]) for e in range(E)]

        def gate_up(e, x):
            return op.MatMul(x, w_gu[e])

        def down(e, a):
            return op.MatMul(a, w_d[e])
    else:
        # The quantize pass's DequantizeLinear weights: each expert's packed slice to MatMulNBits.
        gu, dn = quantized

        def gate_up(e, x):
            return _nbits(op, graph, gu, e, x)

        def down(e, a):
            return _nbits(op, graph, dn, e, a)
    gu_EnI2 = [gate_up(e, x_EnH[e]) for e in range(E)]
    a_EnI = op.Split(ops._swiglu(op, op.Concat(*gu_EnI2, axis=0)), n_E, axis=0, _outputs=E)
    ys = [down(e, a_EnI[e]) for e in range(E)]
    y_PH = op.Concat(*ys, axis=0)
    # Back to pair order: order_P is a permutation of 0..P-1, so sorting it gives its inverse.
    _, inverse_P = op.TopK(order_P, n_P, largest=0, sorted=1, _outputs=2)
    out_PH = op.Gather(y_PH, inverse_P, axis=0)
    if not on_input:
        out_PH = op.Mul(out_PH, s_TK if k == 1 else op.Reshape(s_TK, op.Constant(value_ints=[-1, 1])))
    if k == 1:
        return out_PH
    return op.ReduceSum(op.Reshape(out_PH, op.Constant(value_ints=[-1, k, H])), op.Constant(value_ints=[1]),
                        keepdims=0)


def _nbits(op, graph, d, e, x):
    inputs, attrs = matmul_nbits_expert(graph, d, e, x)
    return op.MatMulNBits(*inputs, **attrs, _domain=ORT_DOMAIN)
