"""ort: ONNX Runtime's com.microsoft.MoE (CPU and CUDA), semantics measured in FACTS.md.

The op routes by itself (top-k of softmax(router_probs)) and, on CPU, takes SwiGLU only with an
interleaved fc1 [E, 2I, H] (even rows gate, odd rows up; ``swiglu_fusion=1``) and fc2 [E, H, I].
- Llama 4 (sigmoid, k=1, score on the input): pre-scale the hidden state by sigmoid(max logit)
  and route by a one-hot of the top-1 expert. On CPU the op gives each thread a block of whole
  experts, so a one-token step would run on one thread: every expert becomes ``EXPERT_PARTS``
  slices of its intermediate size, one block per slice, and the token goes to all slices of its
  expert (k = EXPERT_PARTS, each weighted 1/EXPERT_PARTS, folded back into fc2). One E 128 layer
  decodes in 0.219 ms against 0.277 as one piece (benchmarks/results/ort_moe_layer_forms_H512_E128_t2_parts.md).
- Mixtral (softmax, score on the output, any k): the op's own weighting, renormalized or not.
Refused (reason given): ids/scores not straight from a gating node, sigmoid with k > 1 (a
per-expert input scale the op cannot take), sigmoid with the score on the output, softmax with
the score on the input.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.passes.fusions._graph import Refuse
from moec.passes.lowerings._weights import derived, dims
from moec.passes.lowerings.ort_quant import interleave_gate_up, qmoe, quantized_experts

ORT_DOMAIN = "com.microsoft"
# Slices per expert for sigmoid top-1 routing (Llama 4): how many intra-op threads one token's expert runs on.
EXPERT_PARTS = 2


def lower(op, pair):
    if pair.gating is None:
        raise Refuse("com.microsoft.MoE routes by itself: the expert ids/scores must come from one fused MoEGating")
    g, e = pair.gating_attrs, pair.experts_attrs
    x, logits = pair.x_TH, pair.logits_TE
    graph = pair.experts.graph
    E, H, I = dims(pair)
    sigmoid = g["score_function"] == "sigmoid"
    if sigmoid and not e["score_on_input"]:
        raise Refuse("sigmoid scores on the expert output: com.microsoft.MoE weights outputs by softmax only")
    if sigmoid and g["k"] != 1:
        raise Refuse(f"sigmoid scores on the input with k={g['k']}: com.microsoft.MoE cannot scale each expert's input")
    if not sigmoid and e["score_on_input"]:
        raise Refuse("softmax scores on the expert input: com.microsoft.MoE weights expert outputs")
    quantized = quantized_experts(pair)  # the quantize pass's DequantizeLinear
    # Slices of each float expert for sigmoid top-1 routing (QMoE's packed blocks are not cut).
    # The op hands whole experts to its threads (expert e to thread e * threads // E), so one
    # token's expert runs on one thread. Cut every expert into ``parts`` slices of I (part q of
    # expert e is expert q*E + e: one block of experts per thread) and route each token to all
    # the slices of its expert with weight 1/parts each (folded back into fc2): SwiGLU is
    # elementwise over I and the down projection a sum over I, so the slices' outputs add up to
    # the expert's. The router is a one-hot of the graph's own top-1 (lowest id on ties, as
    # TopK): the logits given ``parts`` times would tie each expert with its own copies.
    parts = EXPERT_PARTS if sigmoid and quantized is None and I % EXPERT_PARTS == 0 else 1
    if sigmoid:
        k, normalize = 1, 1
        if parts > 1 or not g["normalize"]:
            # One TopK: the top-1 logit (its sigmoid is the score) and its expert.
            max_T1, ids_T1 = op.TopK(logits, op.Constant(value_ints=[1]), axis=-1, largest=1, sorted=1, _outputs=2)
        if g["normalize"]:
            x_in = x  # one score renormalized is 1
        else:
            scale_T1 = op.Sigmoid(max_T1)
            if logits.dtype != x.dtype:
                scale_T1 = op.Cast(scale_T1, to=x.dtype)
            x_in = op.Mul(x, scale_T1)
    else:
        x_in, k, normalize = x, g["k"], g["normalize"]
    if parts > 1:
        hot_TE = op.Cast(op.Equal(ids_T1, op.Constant(value=ir.tensor(np.arange(E, dtype=np.int64)[None, :]))),
                         to=x.dtype)
        router, k = op.Concat(*[hot_TE] * parts, axis=-1), parts
    else:
        router = logits if logits.dtype == x.dtype else op.Cast(logits, to=x.dtype)
    if quantized is not None:
        return qmoe(op, pair, x_in, router, k, normalize, quantized)
    Ip = I // parts

    def fc1_of(w):  # [E, H, 2I] -> [parts*E, 2I/parts, H]: row 2i is gate column i, row 2i+1 up column i
        fc1 = interleave_gate_up(w.transpose(0, 2, 1), I)
        return np.concatenate([fc1[:, 2 * q * Ip:2 * (q + 1) * Ip] for q in range(parts)], axis=0)

    def fc2_of(w):  # [E, I, H] -> [parts*E, H, I/parts], times parts: each slice's route weight is 1/parts
        fc2 = w.transpose(0, 2, 1)
        return np.concatenate([fc2[:, :, q * Ip:(q + 1) * Ip] for q in range(parts)], axis=0) * np.asarray(parts, w.dtype)

    suffix = "" if parts == 1 else f"_p{parts}"
    fc1 = derived(graph, pair.w_gate_up_EHI2, f"ort_fc1_E2IH{suffix}", (parts * E, 2 * Ip, H), fc1_of)
    fc2 = derived(graph, pair.w_down_EIH, f"ort_fc2_EHI{suffix}", (parts * E, H, Ip), fc2_of)
    return op.MoE(x_in, router, fc1, None, fc2, k=k, activation_type="swiglu", swiglu_fusion=1,
                  normalize_routing_weights=normalize, _domain=ORT_DOMAIN)
