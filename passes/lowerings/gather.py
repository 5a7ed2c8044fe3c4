"""gather: each token gathers its K experts' weights and runs batched MatMuls, in standard ONNX
ops. Reads only the chosen experts (decode); copies T*K expert matrices (so not for long prefill)."""

from __future__ import annotations

from moec.passes import ops


def lower(op, pair):
    ids, scores = pair.ids_TK, pair.scores_TK
    if pair.gating is not None:
        ids, scores = ops.build_gating(op, pair.logits_TE, **pair.gating_attrs)
    return ops.build_experts_gather(op, pair.x_TH, ids, scores, pair.w_gate_up_EHI2, pair.w_down_EIH,
                                    score_on_input=pair.experts_attrs["score_on_input"], dtype=pair.x_TH.dtype)
