"""ort: ONNX Runtime's com.microsoft.MoE (CPU and CUDA), semantics measured in FACTS.md.

The op routes by itself (top-k of softmax(router_probs)) and, on CPU, takes SwiGLU only with an
interleaved fc1 [E, 2I, H] (even rows gate, odd rows up; ``swiglu_fusion=1``) and fc2 [E, H, I].
- Llama 4 (sigmoid, k=1, score on the input): top-1 of softmax = top-1 of the logits, so pass the
  logits as router_probs, pre-scale the hidden state by sigmoid(max logit) and let the op weight
  the output by 1 (``normalize_routing_weights=1``, k=1).
- Mixtral (softmax, score on the output, any k): the op's own weighting, renormalized or not.
Refused (reason given): ids/scores not straight from a gating node, sigmoid with k > 1 (a
per-expert input scale the op cannot take), sigmoid with the score on the output, softmax with
the score on the input.
"""

from __future__ import annotations

import numpy as np

from moec.passes.fusions._graph import Refuse
from moec.passes.lowerings._weights import derived, dims
from moec.passes.lowerings.ort_quant import qmoe, quantized_experts

ORT_DOMAIN = "com.microsoft"


def lower(op, pair):
    if pair.gating is None:
        raise Refuse("com.microsoft.MoE routes by itself: the expert ids/scores must come from one fused MoEGating")
    g, e = pair.gating_attrs, pair.experts_attrs
    x, logits = pair.x_TH, pair.logits_TE
    graph = pair.experts.graph
    if g["score_function"] == "sigmoid":
        if not e["score_on_input"]:
            raise Refuse("sigmoid scores on the expert output: com.microsoft.MoE weights outputs by softmax only")
        if g["k"] != 1:
            raise Refuse(f"sigmoid scores on the input with k={g['k']}: com.microsoft.MoE cannot scale each expert's input")
        k, normalize = 1, 1
        if g["normalize"]:
            x_in = x  # one score renormalized is 1
        else:
            # top-1 sigmoid score = sigmoid(max logit)
            scale_T1 = op.Sigmoid(op.ReduceMax(logits, op.Constant(value_ints=[-1]), keepdims=1))
            if logits.dtype != x.dtype:
                scale_T1 = op.Cast(scale_T1, to=x.dtype)
            x_in = op.Mul(x, scale_T1)
    else:
        if e["score_on_input"]:
            raise Refuse("softmax scores on the expert input: com.microsoft.MoE weights expert outputs")
        x_in, k, normalize = x, g["k"], g["normalize"]
    router = logits if logits.dtype == x.dtype else op.Cast(logits, to=x.dtype)
    if (quantized := quantized_experts(pair)) is not None:  # the quantize pass's DequantizeLinear
        return qmoe(op, pair, x_in, router, k, normalize, quantized)
    E, H, I = dims(pair)
    fc1 = derived(graph, pair.w_gate_up_EHI2, "ort_fc1_E2IH", (E, 2 * I, H),
                  # [E, I, 2, H] -> [E, 2I, H]: row 2i is gate column i, row 2i+1 up column i.
                  lambda w: np.stack([w[:, :, :I].transpose(0, 2, 1), w[:, :, I:].transpose(0, 2, 1)], axis=2).reshape(E, 2 * I, H))
    fc2 = derived(graph, pair.w_down_EIH, "ort_fc2_EHI", (E, H, I), lambda w: w.transpose(0, 2, 1))
    return op.MoE(x_in, router, fc1, None, fc2, k=k, activation_type="swiglu", swiglu_fusion=1,
                  normalize_routing_weights=normalize, _domain=ORT_DOMAIN)
