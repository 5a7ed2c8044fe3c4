"""trt-native: TopK + score in standard ops, then TensorRT's TRT_MoE custom op, which the ONNX
parser maps to IMoELayer (SM100/SM103/SM110 only; FACTS.md has the schema):
TRT_MoE(hidden [B,S,H], selected_experts [B,S,K] int32, scores [B,S,K], gate [E,H,I], up [E,H,I],
down [E,I,H]; activation_type 1 = SiLU). The layer scales expert OUTPUTS by the scores, so for
Llama 4 (score on the input, k=1) the hidden state is pre-scaled by the score and the layer gets
scores of 1; score-on-input with k > 1 cannot be expressed and is refused.

Quantization (not emitted yet: compiler/quantize_stage.py refuses quantized experts here).
IMoELayer's one quantization is static FP8 of the mul output, the fcDown input
(setQuantizationStatic(fcDownActivationScale [] or [E], DataType), "only FP8 is supported";
setQuantizationDynamicDblQ is "not supported yet" in TensorRT-RTX 1.7). What TensorRT-RTX 1.7.1's
parser reads (from its importTRT_MoE, then a tiny TRT_MoE graph parsed per candidate with the
IMoELayer's getters read back from the network):
- ``quantization_mode`` (int): 0 none (default), 1 static, 2 dynamic double quantization (the
  API refuses it: "IMoELayer::setQuantizationDynamicDblQ: not supported yet");
- ``quantization_dtype`` (int, required with a mode: "quantization_dtype must be specified"): a
  TensorRT DataType value, 6 = kFP8; ONNX's FLOAT8E4M3FN (17) fails ("Parameter check failed ...
  dataType ... < EnumMax<DataType>()");
- ``quantization_block_shape`` (4 ints) and ``dyn_q_output_scale_dtype``: mode 2 only;
- the scale is input 9, biases 6-8 left empty ("Expected at least 10 inputs when quantization
  scale is provided"). Mode 1, dtype 6 and a scalar fp32 scale parse to quantization_to_type FP8
  with input 9 the scale; DequantizeLinear(E4M3) weights on inputs 3-5 parse too.
The lowering of FP8 experts on that basis is on branch i15trt-native-wip; its test is blocked by
quantize_weights meeting a detached GroupedExperts among a weight's uses on fused graphs outside
the trt-rtx pipeline (trt:sm90 / sm100 fail the same way). No engine can be built here either way:
TensorRT-RTX targets no SM100-class GPU, and sm89 / sm120 fail ("Cannot decompose operation moe_fc1")."""

from __future__ import annotations

import onnx_ir as ir

from moec.passes import ops
from moec.passes.fusions._graph import Refuse
from moec.passes.lowerings._weights import derived, dims

TRT_MOE_OP = "TRT_MoE"
TRT_SILU = 1


def lower(op, pair):
    e = pair.experts_attrs
    ids, scores = pair.ids_TK, pair.scores_TK
    if pair.gating is not None:
        ids, scores = ops.build_gating(op, pair.logits_TE, **pair.gating_attrs)
    x = pair.x_TH
    scores = scores if scores.dtype == x.dtype or scores.dtype is None else op.Cast(scores, to=x.dtype)
    if e["score_on_input"]:
        if e["k"] != 1:
            raise Refuse(f"score on the input with k={e['k']}: TRT_MoE scales expert outputs only")
        x = op.Mul(x, scores)
        scores = op.ConstantOfShape(op.Shape(scores), value=ir.tensor([1.0], dtype=pair.x_TH.dtype))
    graph = pair.experts.graph
    E, H, I = dims(pair)
    gate = derived(graph, pair.w_gate_up_EHI2, "gate_EHI", (E, H, I), lambda w: w[:, :, :I])
    up = derived(graph, pair.w_gate_up_EHI2, "up_EHI", (E, H, I), lambda w: w[:, :, I:])
    axis0 = op.Constant(value_ints=[0])
    y_1TH = op.TRT_MoE(
        op.Unsqueeze(x, axis0), op.Unsqueeze(op.Cast(ids, to=ir.DataType.INT32), axis0), op.Unsqueeze(scores, axis0),
        gate, up, pair.w_down_EIH, activation_type=TRT_SILU,
    )
    # onnx has no schema for TRT_MoE, so shape inference cannot type its output: its schema can.
    y_1TH.dtype = pair.x_TH.dtype
    if pair.x_TH.shape is not None:
        y_1TH.shape = ir.Shape([1, *pair.x_TH.shape])
    return op.Squeeze(y_1TH, axis0)
