"""moec's own ONNX ops: their schemas, and a body for each in standard ONNX ops.

The fusions produce these two ops; the lowerings replace them with what a target runs; the kernel
and the TensorRT plugin (runtime/) implement ``GroupedExperts`` with exactly this input order,
these layouts and these attributes. Domain ``moec`` (``MOEC_DOMAIN``), opset version 1.

moec.MoEGating
--------------
Inputs
  0 router_logits_TE  float32 | float16 | bfloat16  [T, E]   router logits, one row per token
Outputs
  0 expert_ids_TK     int64                          [T, K]   chosen experts, best first
  1 scores_TK         same dtype as router_logits_TE [T, K]   the weight of each chosen expert
Attributes
  k               int (1 <= k <= E)            experts per token
  score_function  string "sigmoid" | "softmax"
  normalize       int 0 | 1                    divide the K scores of a token by their sum
Semantics
  sigmoid (Llama 4):   ids, v = TopK(logits, k);           scores = Sigmoid(v)
  softmax (Mixtral):   ids, v = TopK(Softmax(logits), k);  scores = v
  normalize=1:         scores = scores / ReduceSum(scores, axis=-1)
  TopK is ONNX's (largest, sorted; ties go to the lower expert index).

moec.GroupedExperts
-------------------
Inputs
  0 hidden_TH         float32 | float16 | bfloat16  [T, H]
  1 expert_ids_TK     int64 | int32                  [T, K]   values in [0, E)
  2 scores_TK         float32 or hidden's dtype      [T, K]   cast to hidden's dtype before use
  3 w_gate_up_EHI2    hidden's dtype                 [E, H, 2I]  columns [0, I) gate, [I, 2I) up
  4 w_down_EIH        hidden's dtype                 [E, I, H]
Outputs
  0 out_TH            hidden's dtype                 [T, H]
Attributes
  activation      string "swiglu" (the only one)
  score_on_input  int 1: the score scales the expert's INPUT (Llama 4);
                      0: the score scales the expert's OUTPUT (Mixtral)
  k               int  == K (documentation for kernels that specialise on it)
Semantics, for every token t, with e = expert_ids_TK[t, j], s = scores_TK[t, j]:
  x  = s * hidden_TH[t]            if score_on_input else hidden_TH[t]
  gu = x @ w_gate_up_EHI2[e]                                     [2I]
  a  = SiLU(gu[:I]) * gu[I:]                                     [I]
  y  = a @ w_down_EIH[e]                                         [H]
  out_TH[t] = sum_j (y if score_on_input else s * y)
Only the K chosen experts contribute (an expert with score 0 contributes 0: there are no biases).

Function bodies
---------------
``attach_functions(model)`` adds a model-local ONNX function for every distinct attribute set in
use; a node names its body with ``overload`` (IR version 10), so ONNX Runtime runs a fused graph
as is. The bodies are built by the same builders the ``dense`` lowering uses, so there is one
standard-op definition of each op.
"""

from __future__ import annotations

from typing import Any, Sequence

import onnx_ir as ir

from moec.common.contract import MOEC_DOMAIN, MOEC_OPSET_VERSION, OP_GROUPED_EXPERTS, OP_MOE_GATING
from moec.common.errors import MoecError

SCORE_FUNCTIONS = ("sigmoid", "softmax")
ACTIVATIONS = ("swiglu",)
FLOAT_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
# Split(num_outputs=...) needs opset 18; the bodies and lowerings use it.
MIN_OPSET = 18

# The op builders below take ``op``: anything with onnxscript's builder interface
# (``op.MatMul(a, b)``, ``_outputs=``, ``_domain=``): an ``OpBuilder`` or the context an
# onnxscript rewrite rule receives.


def gating_overload(k: int, score_function: str, normalize: int) -> str:
    return f"{score_function}_k{k}_n{normalize}"


def experts_overload(activation: str, score_on_input: int) -> str:
    return f"{activation}_{'in' if score_on_input else 'out'}"


def moe_gating(op, logits_TE, *, k: int, score_function: str, normalize: int):
    """Emit one moec.MoEGating node; returns (expert_ids_TK, scores_TK)."""
    ids, scores = op.MoEGating(
        logits_TE, k=k, score_function=score_function, normalize=normalize,
        _domain=MOEC_DOMAIN, _outputs=2,
    )
    _set_overload(ids, gating_overload(k, score_function, normalize))
    return ids, scores


def grouped_experts(op, x_TH, ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, *, k: int, score_on_input: int,
                    activation: str = "swiglu"):
    """Emit one moec.GroupedExperts node; returns out_TH."""
    out = op.GroupedExperts(
        x_TH, ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH,
        activation=activation, score_on_input=score_on_input, k=k, _domain=MOEC_DOMAIN,
    )
    _set_overload(out, experts_overload(activation, score_on_input))
    return out


def _set_overload(value: ir.Value, overload: str) -> None:
    node = value.producer()
    if node is not None:
        node.overload = overload


class OpBuilder(ir.tape.Tape):
    """``op.MatMul(a, b, _outputs=2, _domain=...)``-style node recording, the interface onnxscript's
    rewrite rules receive. onnx-ir has one (``_tape.Builder``) but does not export it."""

    def __getattr__(self, op_type: str):
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs, _domain: str = "", _outputs: int = 1, _version: int | None = None, **attrs):
            if _outputs == 1:
                return self.op(op_type, inputs, attrs, domain=_domain, version=_version)
            return tuple(self.op_multi_out(op_type, inputs, attrs, num_outputs=_outputs, domain=_domain, version=_version))

        return make


# --- standard-op definitions ---------------------------------------------------------------------


def build_gating(op, logits_TE, *, k: int, score_function: str, normalize: int):
    """MoEGating in standard ops; returns (expert_ids_TK int64, scores_TK)."""
    k_1 = op.Constant(value_ints=[k])
    if score_function == "sigmoid":
        top_TK, ids_TK = op.TopK(logits_TE, k_1, axis=-1, largest=1, sorted=1, _outputs=2)
        scores_TK = op.Sigmoid(top_TK)
    elif score_function == "softmax":
        scores_TK, ids_TK = op.TopK(op.Softmax(logits_TE, axis=-1), k_1, axis=-1, largest=1, sorted=1, _outputs=2)
    else:
        raise ValueError(f"score_function {score_function!r}")
    if normalize:
        scores_TK = op.Div(scores_TK, op.ReduceSum(scores_TK, op.Constant(value_ints=[-1]), keepdims=1))
    return ids_TK, scores_TK


def _swiglu(op, gate_up):
    gate, up = op.Split(gate_up, axis=-1, num_outputs=2, _outputs=2)
    return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)


def _cast_like(op, value, like, dtype: ir.DataType | None):
    # A static Cast where the dtype is known: TensorRT's parser and most runtimes take Cast;
    # CastLike keeps the function bodies dtype-generic.
    return op.CastLike(value, like) if dtype is None else op.Cast(value, to=dtype)


def build_experts_dense(op, x_TH, ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, *, score_on_input: int,
                        dtype: ir.DataType | None = None):
    """GroupedExperts in standard ops, the all-experts form: every expert runs on every token with
    a dense [T, E] weight matrix that is zero where an expert was not chosen (E times the work of
    the chosen experts; no gathers, so it suits small E at large T)."""
    s_TK = _cast_like(op, scores_TK, x_TH, dtype)
    shape_TE = op.Concat(
        op.Shape(x_TH, start=0, end=1), op.Shape(w_gate_up_EHI2, start=0, end=1), axis=0
    )
    zeros_TE = _cast_like(op, op.ConstantOfShape(shape_TE), x_TH, dtype)
    dense_TE = op.ScatterElements(zeros_TE, op.Cast(ids_TK, to=ir.DataType.INT64), s_TK, axis=1)
    dense_ET1 = op.Unsqueeze(op.Transpose(dense_TE, perm=[1, 0]), op.Constant(value_ints=[-1]))
    x_1TH = op.Unsqueeze(x_TH, op.Constant(value_ints=[0]))
    h_ETH = op.Mul(x_1TH, dense_ET1) if score_on_input else x_1TH
    y_ETH = op.MatMul(_swiglu(op, op.MatMul(h_ETH, w_gate_up_EHI2)), w_down_EIH)
    if not score_on_input:
        y_ETH = op.Mul(y_ETH, dense_ET1)
    return op.ReduceSum(y_ETH, op.Constant(value_ints=[0]), keepdims=0)


def build_experts_gather(op, x_TH, ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, *, score_on_input: int,
                         dtype: ir.DataType | None = None):
    """GroupedExperts in standard ops, the gather form: each token gathers its K experts' weights
    and runs batched [1, H] x [H, 2I] MatMuls. It reads only the chosen experts (what decode
    needs) but copies T*K expert matrices, so it suits small T."""
    s_TK = _cast_like(op, scores_TK, x_TH, dtype)
    w_gu_TKHI2 = op.Gather(w_gate_up_EHI2, ids_TK, axis=0)
    w_d_TKIH = op.Gather(w_down_EIH, ids_TK, axis=0)
    x_T11H = op.Unsqueeze(x_TH, op.Constant(value_ints=[1, 2]))
    s_TK11 = op.Unsqueeze(s_TK, op.Constant(value_ints=[2, 3]))
    h_TK1H = op.Mul(x_T11H, s_TK11) if score_on_input else x_T11H
    y_TK1H = op.MatMul(_swiglu(op, op.MatMul(h_TK1H, w_gu_TKHI2)), w_d_TKIH)
    if not score_on_input:
        y_TK1H = op.Mul(y_TK1H, s_TK11)
    return op.ReduceSum(y_TK1H, op.Constant(value_ints=[1, 2]), keepdims=0)


def build_experts_switch(op, x_TH, ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, *, score_on_input: int, k: int,
                         dtype: ir.DataType | None = None, name: str = "moe_switch"):
    """GroupedExperts in standard ops, choosing at run time: the gather form while T*K <= E (it
    then copies no more expert matrices than dense reads: decode and short prompts), the dense
    form above (prefill, where gather would copy T*K expert matrices). One ONNX If."""
    branches = []
    for build in (build_experts_gather, build_experts_dense):
        sub = OpBuilder()
        y = sub.Identity(build(sub, x_TH, ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH,
                               score_on_input=score_on_input, dtype=dtype))
        y.dtype = dtype
        for i, node in enumerate(sub.nodes):
            node.name = f"{name}/{build.__name__[15:]}/{node.op_type}_{i}"
            for j, v in enumerate(node.outputs):
                v.name = v.name or f"{node.name}_{j}"
        branches.append(ir.Graph([], [y], nodes=sub.nodes, name=f"{name}_{build.__name__[15:]}"))
    tokens_x_k = op.Mul(op.Shape(x_TH, start=0, end=1), op.Constant(value_ints=[k]))
    cond = op.Squeeze(op.LessOrEqual(tokens_x_k, op.Shape(w_gate_up_EHI2, start=0, end=1)))
    return op.If(cond, then_branch=branches[0], else_branch=branches[1])


# --- model-local functions -------------------------------------------------------------------------


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def gating_attrs(node: ir.Node) -> dict[str, Any]:
    attrs = {
        "k": int(_attr(node, "k", 1)),
        "score_function": str(_attr(node, "score_function", "sigmoid")),
        "normalize": int(_attr(node, "normalize", 0)),
    }
    if attrs["score_function"] not in SCORE_FUNCTIONS:
        raise MoecError(f"node {node.name!r}: moec.MoEGating score_function {attrs['score_function']!r} is not one of {SCORE_FUNCTIONS}")
    return attrs


def experts_attrs(node: ir.Node) -> dict[str, Any]:
    attrs = {
        "activation": str(_attr(node, "activation", "swiglu")),
        "score_on_input": int(_attr(node, "score_on_input", 1)),
        "k": int(_attr(node, "k", 1)),
    }
    if attrs["activation"] not in ACTIVATIONS:
        raise MoecError(f"node {node.name!r}: moec.GroupedExperts activation {attrs['activation']!r} is not one of {ACTIVATIONS}")
    return attrs


def _make_function(name: str, overload: str, input_names: Sequence[str], output_names: Sequence[str], build,
                   opset: int) -> ir.Function:
    inputs = [ir.Value(name=n) for n in input_names]
    op = OpBuilder()
    outs = build(op, *inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    # The body's outputs carry the op's output names; identities keep them distinct values.
    outputs = [op.Identity(v) for v in outs]
    for v, n in zip(outputs, output_names):
        v.name = n
    for i, node in enumerate(op.nodes):
        node.name = f"{node.op_type}_{i}"
        for j, v in enumerate(node.outputs):
            if not v.name:
                v.name = f"{node.op_type.lower()}_{i}_{j}"
    graph = ir.Graph(inputs, outputs, nodes=op.nodes, opset_imports={"": opset}, name=f"{name}_{overload}")
    return ir.Function(MOEC_DOMAIN, name, overload, graph=graph, attributes=[])


def gating_function(attrs: dict[str, Any], opset: int) -> ir.Function:
    return _make_function(
        OP_MOE_GATING, gating_overload(**attrs), ["router_logits_TE"], ["expert_ids_TK", "scores_TK"],
        lambda op, logits: build_gating(op, logits, **attrs), opset,
    )


def experts_function(attrs: dict[str, Any], opset: int) -> ir.Function:
    return _make_function(
        OP_GROUPED_EXPERTS, experts_overload(attrs["activation"], attrs["score_on_input"]),
        ["hidden_TH", "expert_ids_TK", "scores_TK", "w_gate_up_EHI2", "w_down_EIH"], ["out_TH"],
        lambda op, *xs: build_experts_dense(op, *xs, score_on_input=attrs["score_on_input"]), opset,
    )


def moec_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph)
            if n.domain == MOEC_DOMAIN and n.op_type in (OP_MOE_GATING, OP_GROUPED_EXPERTS)]


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def attach_functions(model: ir.Model) -> int:
    """Give every moec node a model-local function body (and set its overload); returns how many
    functions were added. Bodies already present are kept."""
    opset = default_opset(model)
    added = 0
    for node in moec_nodes(model):
        if node.op_type == OP_MOE_GATING:
            attrs = gating_attrs(node)
            node.overload = gating_overload(**attrs)
            make = gating_function
        elif node.op_type == OP_GROUPED_EXPERTS:
            attrs = experts_attrs(node)
            node.overload = experts_overload(attrs["activation"], attrs["score_on_input"])
            make = experts_function
        if opset < MIN_OPSET:
            raise MoecError(
                f"the model imports ONNX opset {opset}; moec's function bodies need opset >= {MIN_OPSET} "
                "(re-export with a newer opset)"
            )
        key = (MOEC_DOMAIN, node.op_type, node.overload)
        if key not in model.functions:
            model.functions[key] = make(attrs, opset)
            added += 1
    if moec_nodes(model):
        model.opset_imports[MOEC_DOMAIN] = MOEC_OPSET_VERSION
        # Node overloads and functions with overloads exist from IR version 10.
        model.ir_version = max(model.ir_version or 0, 10)
    return added


def remove_unused_functions(model: ir.Model) -> None:
    used = {(n.domain, n.op_type, n.overload) for n in moec_nodes(model)}
    for key in [k for k in model.functions if k[0] == MOEC_DOMAIN and k not in used]:
        del model.functions[key]
    # The TensorRT plugin node shares the domain (common/contract.py), so look at every node.
    if not any(n.domain == MOEC_DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph)):
        model.opset_imports.pop(MOEC_DOMAIN, None)
