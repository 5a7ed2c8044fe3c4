"""The NumPy reference of a quantized graph: the export with each quantized weight replaced by its
dequantized value, (q - zero_point) * scale computed in NumPy from the optimized graph's own
initializers. ONNX Runtime on that reference runs the same quantized arithmetic in plain fp32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.passes.quantize import dequantize
from moec.passes.quantize._base import QTensor


def optimize_dq_form(export_path, out_path, config) -> None:
    """optimize_onnx for a TensorRT target, asymmetric int4 included: the DequantizeLinear form
    (zero points) runs on ONNX Runtime, so the same-numbers tests check it there, though TensorRT
    cannot build it (moec refuses it for trt targets: compiler/quantize_stage.py; lifted here only)."""
    import warnings
    from unittest import mock

    from moec.compiler.pipeline import optimize_onnx

    with warnings.catch_warnings(), mock.patch("moec.compiler.quantize_stage.asymmetric_int4_reason",
                                               return_value=None):
        warnings.simplefilter("ignore")
        optimize_onnx(export_path, out_path, config)


def dequantized_weights(optimized: ir.Model) -> dict[str, np.ndarray]:
    """{original weight name: dequantized fp32 array} for every DequantizeLinear the quantize pass
    wrote (read back from the nodes' inputs: what the engine itself will hold)."""
    out = {}
    nodes = [n for n in ir.traversal.RecursiveGraphIterator(optimized.graph) if n.op_type == "DequantizeLinear"]
    for node in nodes:
        q, scale, zp = (list(node.inputs) + [None, None])[:3]
        qa = q.const_value.numpy().astype(np.float32)
        sa = scale.const_value.numpy().astype(np.float32)
        axis = node.attributes["axis"].value
        block = node.attributes["block_size"].value if "block_size" in node.attributes else 0
        if not block:  # per-axis: a 1D scale on `axis`; as blocks: the other axis is one block
            red = 1 - axis
            block, axis = qa.shape[red], red
            sa = np.expand_dims(sa, red)
        za = None if zp is None else np.broadcast_to(zp.const_value.numpy().astype(np.float32), sa.shape)
        out[node.name.split("/dequantize_")[0]] = dequantize(QTensor(qa, sa, za, axis, block))
    return out


def reference_model(export_path, optimized: ir.Model, quantized_names: dict[str, np.ndarray] | None = None) -> ir.Model:
    weights = quantized_names if quantized_names is not None else dequantized_weights(optimized)
    model = ir.load(export_path)
    found = 0
    for name, value in model.graph.initializers.items():
        if name in weights:
            value.const_value = ir.tensor(weights[name].astype(np.float32))
            found += 1
    assert found == len(weights), (found, len(weights))
    return model
