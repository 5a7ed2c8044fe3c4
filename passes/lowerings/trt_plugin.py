"""trt-plugin: one node naming moec's TensorRT plugin (common/contract.py), which runs the grouped
experts kernel (runtime/). The parser finds the plugin by op_type, ``plugin_version`` and
``plugin_namespace``. Inputs as moec.GroupedExperts, expert ids as int32:
(hidden_TH, expert_ids_TK int32, scores_TK, w_gate_up_EHI2, w_down_EIH); attribute score_on_input.
The gating becomes TopK + score in standard ops."""

from __future__ import annotations

import onnx_ir as ir

from moec.common.contract import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from moec.passes import ops


def lower(op, pair):
    ids, scores = pair.ids_TK, pair.scores_TK
    if pair.gating is not None:
        ids, scores = ops.build_gating(op, pair.logits_TE, **pair.gating_attrs)
    ids32 = op.Cast(ids, to=ir.DataType.INT32)
    return getattr(op, PLUGIN_NAME)(
        pair.x_TH, ids32, scores, pair.w_gate_up_EHI2, pair.w_down_EIH,
        score_on_input=pair.experts_attrs["score_on_input"],
        plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE, _domain=PLUGIN_NAMESPACE,
    )
