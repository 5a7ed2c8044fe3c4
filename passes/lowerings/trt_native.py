"""trt-native: TopK + score in standard ops, then TensorRT's TRT_MoE custom op, which the ONNX
parser maps to IMoELayer (SM100/SM103/SM110 only; FACTS.md has the schema):
TRT_MoE(hidden [B,S,H], selected_experts [B,S,K] int32, scores [B,S,K], gate [E,H,I], up [E,H,I],
down [E,I,H]; activation_type 1 = SiLU). The layer scales expert OUTPUTS by the scores, so for
Llama 4 (score on the input, k=1) the hidden state is pre-scaled by the score and the layer gets
scores of 1; score-on-input with k > 1 cannot be expressed and is refused.

Quantized experts (``--quantize fp8``). IMoELayer's one quantization is static FP8 of the mul
output, the fcDown input (setQuantizationStatic(fcDownActivationScale [] or [E], DataType): "only
FP8 is supported"; setQuantizationDynamicDblQ, the block-shaped dynamic one, is "not supported
yet" in TensorRT-RTX 1.7's API). What the parser reads, established against TensorRT-RTX 1.7.1's
parser (its importTRT_MoE, and parsing a tiny TRT_MoE graph per candidate, reading the
IMoELayer's getters back from the network):
- ``quantization_mode`` (int): 0 none (default), 1 static, 2 dynamic double quantization
  (refused by the API: "IMoELayer::setQuantizationDynamicDblQ: not supported yet");
- ``quantization_dtype`` (int, required with a mode: "quantization_dtype must be specified"): a
  TensorRT DataType value, 6 = kFP8 (ONNX's FLOAT8E4M3FN, 17, is rejected: "Parameter check
  failed ... dataType ... < EnumMax<DataType>()");
- ``quantization_block_shape`` (4 ints) and ``dyn_q_output_scale_dtype``: mode 2 only;
- the scale is input 9 (biases 6-8 left empty): "Expected at least 10 inputs when quantization
  scale is provided". With mode 1 and dtype 6 the parsed layer reads back quantization_to_type
  FP8 and input 9 = the scale.
So the lowering takes FP8 weights only, each a DequantizeLinear of E4M3 values (a scale per
expert and output channel) feeding TRT_MoE's gate / up / down inputs, the hidden state's Q/DQ of
``--quantize-activations static`` before it as on any FP8 GEMM, and, with static (not
static-no-down), mode 1 with the routed down_proj input's calibrated per-tensor scale (amax /
448; fp8_act.py records it on the GroupedExperts node). int4 / int8 / nvfp4 experts are refused
(by name before any work for ``--moe-lowering trt-native``: compiler/quantize_stage.py; the
default lowering falls back to hybrid): IMoELayer's API has no weight quantization of its own,
and whether its SM100 kernels take blocked DequantizeLinear weights cannot be seen here.

No engine can be built from this lowering here: IMoELayer builds for SM100 / SM103 / SM110 only,
which TensorRT-RTX does not target (sm89 / sm120 builds fail: "Cannot decompose operation
moe_fc1"), and full TensorRT does not install on this machine. The tests read the parsed network
back (the layer's quantization settings), and check the numbers of the graph around TRT_MoE with
the op replaced by its reference arithmetic in NumPy (tests/passes/test_trt_native_fp8.py); how
IMoELayer's SM100 kernels round the FP8 down input is not observable here.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.passes import ops
from moec.passes.fusions._graph import Refuse
from moec.passes.lowerings._weights import derived, dims

TRT_MOE_OP = "TRT_MoE"
TRT_SILU = 1
TRT_QUANT_STATIC = 1  # quantization_mode
TRT_DTYPE_FP8 = 6  # nvinfer1::DataType::kFP8, what quantization_dtype takes
DOWN_SCALE_ATTR = "fp8_down_input_scale"  # on moec.GroupedExperts, from fp8_act.py


def _gate_up(op, graph, w_EHI2, E: int, H: int, I: int):
    """gate [E,H,I] and up [E,H,I]: slices of a float initializer, or of an FP8 DequantizeLinear's
    values and per-channel scales (a DequantizeLinear each)."""
    from moec.passes.lowerings.ort_quant import dequantized

    d = dequantized(w_EHI2)
    if d is None:
        return (derived(graph, w_EHI2, "gate_EHI", (E, H, I), lambda w: w[:, :, :I]),
                derived(graph, w_EHI2, "up_EHI", (E, H, I), lambda w: w[:, :, I:]))
    out = []
    for name, part in (("gate", slice(0, I)), ("up", slice(I, 2 * I))):
        q = derived(graph, d.q, f"{name}_EHI", (E, H, I), lambda w, p=part: w[:, :, p])
        s_shape = tuple(int(x) for x in d.scale.shape)
        s = derived(graph, d.scale, f"{name}_scale", (*s_shape[:-1], I), lambda w, p=part: w[..., p])
        zp = None if d.zero_point is None else derived(
            graph, d.zero_point, f"{name}_zero_point", (*s_shape[:-1], I), lambda w, p=part: w[..., p])
        attrs = {"axis": d.axis, **({"block_size": d.block_size} if d.block_size else {})}
        out.append(op.DequantizeLinear(q, s, *([zp] if zp is not None else []), **attrs))
    return tuple(out)


def _check_weights(pair) -> bool:
    """True for FP8 DequantizeLinear expert weights, False for float ones; refuses the rest."""
    from moec.passes.lowerings.ort_quant import dequantized

    ds = [dequantized(w) for w in (pair.w_gate_up_EHI2, pair.w_down_EIH)]
    if all(d is None for d in ds) and all(w.producer() is None for w in (pair.w_gate_up_EHI2, pair.w_down_EIH)):
        return False
    for w, d in zip((pair.w_gate_up_EHI2, pair.w_down_EIH), ds):
        if d is None or d.q.dtype != ir.DataType.FLOAT8E4M3FN:
            what = d.q.dtype if d is not None else "not a DequantizeLinear of initializers"
            raise Refuse(f"expert weight {w.name!r} is {what}: TRT_MoE (IMoELayer) takes float or FP8 (E4M3) "
                         "expert weights only")
    return True


def lower(op, pair):
    e = pair.experts_attrs
    ids, scores = pair.ids_TK, pair.scores_TK
    fp8 = _check_weights(pair)
    if pair.gating is not None:
        ids, scores = ops.build_gating(op, pair.logits_TE, **pair.gating_attrs)
    x = pair.x_TH
    # The gating's scores are fp32 (and untyped where build_gating made them): cast unless known equal,
    # else an fp16 / bf16 Mul(x, scores) has mixed inputs (TensorRT: "must have same input types").
    scores = scores if scores.dtype == x.dtype or x.dtype is None else op.Cast(scores, to=x.dtype)
    if e["score_on_input"]:
        if e["k"] != 1:
            raise Refuse(f"score on the input with k={e['k']}: TRT_MoE scales expert outputs only")
        x = op.Mul(x, scores)
        scores = op.ConstantOfShape(op.Shape(scores), value=ir.tensor([1.0], dtype=pair.x_TH.dtype))
    graph = pair.experts.graph
    E, H, I = dims(pair)
    gate, up = _gate_up(op, graph, pair.w_gate_up_EHI2, E, H, I)
    axis0 = op.Constant(value_ints=[0])
    inputs = [op.Unsqueeze(x, axis0), op.Unsqueeze(op.Cast(ids, to=ir.DataType.INT32), axis0),
              op.Unsqueeze(scores, axis0), gate, up, pair.w_down_EIH]
    attrs = {"activation_type": TRT_SILU}
    down_scale = pair.experts.attributes.get(DOWN_SCALE_ATTR)
    if fp8 and down_scale is not None:  # static FP8 of the mul output (the fcDown input); biases 6-8 empty
        inputs += [None, None, None, op.Constant(value=ir.tensor(np.float32(down_scale.value)))]
        attrs.update(quantization_mode=TRT_QUANT_STATIC, quantization_dtype=TRT_DTYPE_FP8)
    y_1TH = op.TRT_MoE(*inputs, **attrs)
    # onnx has no schema for TRT_MoE, so shape inference cannot type its output: its schema can.
    y_1TH.dtype = pair.x_TH.dtype
    if pair.x_TH.shape is not None:
        y_1TH.shape = ir.Shape([1, *pair.x_TH.shape])
    return op.Squeeze(y_1TH, axis0)
