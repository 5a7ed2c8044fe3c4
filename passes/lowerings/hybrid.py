"""hybrid: the gather form while T*K <= E, the dense form above, in standard ONNX ops (one If).

Decode (T = batch) reads only the chosen experts; a long prompt runs all experts densely instead
of copying T*K expert matrices (for Scout at T=4096 the gather form would copy terabytes).
TensorRT builds both branches and picks one per call from the input shape."""

from __future__ import annotations

from moec.passes import ops


def lower(op, pair):
    ids, scores = pair.ids_TK, pair.scores_TK
    if pair.gating is not None:
        ids, scores = ops.build_gating(op, pair.logits_TE, **pair.gating_attrs)
    return ops.build_experts_switch(op, pair.x_TH, ids, scores, pair.w_gate_up_EHI2, pair.w_down_EIH,
                                    score_on_input=pair.experts_attrs["score_on_input"], k=pair.experts_attrs["k"],
                                    dtype=pair.x_TH.dtype, name=f"{pair.experts.name}/hybrid")
