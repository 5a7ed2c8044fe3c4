"""FP8 activations for FP8 weights (``--quantize fp8 --quantize-activations static``, W8A8).

Every FP8 weight's activation input gets QuantizeLinear -> DequantizeLinear in float8e4m3fn
(opset 19+) with one static per-tensor scale, amax / 448 (E4M3's largest finite value), the amax
being the largest |x| that input took on the calibration prompts (calibrate.py). So the product
is DQ(x8) @ DQ(w8): TensorRT fuses the two DQ into an FP8 GEMM; ONNX Runtime's CPU provider runs
float8 QuantizeLinear / DequantizeLinear and computes the same arithmetic in fp32. A value beyond
the calibrated amax saturates at +-448 * scale (QuantizeLinear's saturate=1, its default).

Sites:
- MatMul / Gemm weights: the Q/DQ sits on that node's activation input.
- The routed experts: on the fused op's input x_TH, with the amax of x_TH itself (the router's
  input; the score multiplies after the Q/DQ, and a sigmoid score is <= 1, so the score-scaled
  rows the gate_up product reads stay within that range). The down projection's input lives
  inside the fused op and stays in the model's float dtype: the experts are W8A8 on gate_up and
  W8A16 on down, except on trt-native, whose TRT_MoE quantizes it itself from a static scale (its
  calibrated amax / 448, recorded on the fused node: lowerings/trt_native.py).

``--quantize-activations static-no-down`` leaves every down_proj's input in float too (the dense
MLPs' and the shared expert's; the routed experts' already is): that input is the SwiGLU product,
whose range is wide (amax ~3000 on SmolLM2-135M's layers against ~10-50 for the others), so one
per-tensor scale sized for its outliers rounds its many small values to E4M3's subnormals or to 0.
Those weights stay FP8 (weight-only); gate_up / q, k, v, o stay W8A8.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import onnx_ir as ir

from moec.common.contract import MOEC_DOMAIN, OP_GROUPED_EXPERTS
from moec.passes.quantize.calibrate import experts_hidden_key
from moec.passes.quantize.fp8 import E4M3_MAX

# A dense MLP's or shared expert's down projection. The routed experts' down_proj matches too, and skipping it
# changes nothing: its input is inside the fused op, and gate_up_proj's site puts the Q/DQ on the op's input.
_DOWN = re.compile(r"(^|\.)down_proj(\.weight)?(\.T)?$")


def activation_scale(x: np.ndarray) -> np.float32:
    amax = float(np.abs(x).max()) if x.size else 0.0
    return np.float32(amax / E4M3_MAX if amax > 0 else 1.0)


def _insert_qdq(graph: ir.Graph, node: ir.Node, scale: np.float32, np_dtype, name: str) -> None:
    x = node.inputs[0]
    s = ir.tensor(np.asarray(scale, np_dtype))
    base = f"{name}.act{sum(1 for v in graph.initializers if v.startswith(name + '.act'))}"
    scale_v = ir.Value(name=f"{base}.scale", shape=ir.Shape([]), type=ir.TensorType(s.dtype), const_value=s)
    zp = ir.tensor(np.zeros((), ml_dtypes.float8_e4m3fn))
    zp_v = ir.Value(name=f"{base}.zero_point", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT8E4M3FN),
                    const_value=zp)
    graph.register_initializer(scale_v)
    graph.register_initializer(zp_v)
    q = ir.Node("", "QuantizeLinear", [x, scale_v, zp_v], name=f"{base}/quantize_fp8")
    q.outputs[0].name, q.outputs[0].dtype, q.outputs[0].shape = f"{base}.fp8", ir.DataType.FLOAT8E4M3FN, x.shape
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale_v, zp_v], name=f"{base}/dequantize_fp8")
    dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = f"{base}.dq", x.dtype, x.shape
    graph.insert_before(node, q)
    graph.insert_before(node, dq)
    node.replace_input_with(0, dq.outputs[0])


def _record_experts_down_scale(site, stats) -> None:
    """The routed experts' down_proj input (the SwiGLU product, inside the fused op): its static
    per-tensor scale goes on the GroupedExperts node as an attribute, which only the trt-native
    lowering reads (TRT_MoE's quantization_mode 1: lowerings/trt_native.py); the others keep that
    input in float."""
    from moec.passes.lowerings.trt_native import DOWN_SCALE_ATTR

    key = site.value.name.removesuffix(".T")
    if site.kind != "experts" or not is_down_proj(key) or key not in stats:
        return
    for node, _ in site.uses:
        if node.domain == MOEC_DOMAIN and node.op_type == OP_GROUPED_EXPERTS:
            node.attributes[DOWN_SCALE_ATTR] = ir.AttrFloat32(DOWN_SCALE_ATTR, float(activation_scale(stats[key])))


def is_down_proj(weight_name: str) -> bool:
    return _DOWN.search(weight_name) is not None


def add_fp8_activations(model: ir.Model, sites, calibration, log=None, skip_down: bool = False) -> int:
    """Q/DQ the activation input of every node an FP8 weight of ``sites`` feeds; returns how many
    Q/DQ pairs. A node calibration did not see keeps a float input (the log says so).
    ``skip_down``: a down_proj's input stays float (static-no-down)."""
    graph, count, seen = model.graph, 0, set()
    stats = calibration.inputs
    for site in sites:
        if skip_down and is_down_proj(site.value.name):
            continue
        _record_experts_down_scale(site, stats)
        for node, _ in site.uses:
            if id(node) in seen:
                continue
            seen.add(id(node))
            experts = node.domain == MOEC_DOMAIN and node.op_type == OP_GROUPED_EXPERTS
            key = experts_hidden_key(site.value.name) if experts else site.value.name.removesuffix(".T")
            if key not in stats:
                if log is not None:
                    log.refuse("fp8_activations", node, f"{site.value.name}: calibration did not see its input; "
                               "its activation stays in float (weight-only FP8)")
                continue
            np_dtype = {ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}.get(
                node.inputs[0].dtype, np.float32)
            _insert_qdq(graph, node, activation_scale(stats[key]), np_dtype, site.value.name)
            count += 1
    return count
