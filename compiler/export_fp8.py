"""A pre-quantized (FP8) checkpoint's weights stay FP8 in the export: each becomes
DequantizeLinear(q float8e4m3fn, scale) of the checkpoint's own values, never a wider copy.

The trace sees float parameters (moec's torch model), so the graph first holds a float initializer
per weight; this replaces it, after the export's own folding and optimizer have run (a
DequantizeLinear of constants would otherwise be folded back into floats where it is small). The
layout is the one the quantize pass writes for fp8 (passes/quantize/apply.py), so every lowering
and the optimize stage read them alike:
- experts [E, K, N]: scale [E, 1, N], axis 1, block_size K;
- a Linear as MatMul weight [K, N] (the export's folded ``X.weight.T``): scale [N], axis 1; as
  its own [N, K] (Gemm transB): scale [N], axis 0.
The scale is stored in the graph's float dtype (the DequantizeLinear's output dtype): exact for
fp32, rounded like any other weight for bf16 / fp16.
"""

from __future__ import annotations

import numpy as np

FORMAT_RECORD = {"format": "fp8", "granularity": "per_output_channel", "symmetric": True,
                 "calibration": "none (pre-quantized checkpoint)", "routing": "full precision"}


def _numpy(t, dtype=None) -> np.ndarray:
    import ml_dtypes
    import torch

    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).contiguous().numpy().view(ml_dtypes.float8_e4m3fn)
    a = t.float().numpy()
    return a if dtype is None else a.astype(dtype)


def keep_fp8_weights(onnx_model, sources: dict) -> int:
    """Replace every float initializer whose source is an ``Fp8Weight`` (directly, or through the
    export's folded transpose ``.T``) by a DequantizeLinear of the FP8 values; returns how many."""
    import ml_dtypes
    import onnx_ir as ir

    from moec.models.fp8_checkpoint import Fp8Weight
    from moec.passes.fusions._graph import ensure_opset
    from moec.passes.quantize.apply import DQ_OPSET, _position

    np_dtype = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16,
                ir.DataType.BFLOAT16: ml_dtypes.bfloat16}
    graph = onnx_model.graph
    kept = 0
    for value in list(graph.initializers.values()):
        name = value.name
        transposed = name.endswith(".T") and isinstance(sources.get(name[:-2]), Fp8Weight)
        weight = sources.get(name[:-2] if transposed else name)
        if not isinstance(weight, Fp8Weight) or not value.uses():
            continue
        if weight.q.dim() == 3:  # experts [E, K, N]
            q, scale, axis, block = weight.q, weight.scale, 1, int(weight.q.shape[1])
        else:  # Linear [N, K], scale [N, 1]
            q = weight.q.t() if transposed else weight.q
            scale, axis, block = weight.scale.reshape(-1), 1 if transposed else 0, None
        if tuple(q.shape) != tuple(int(d) for d in value.shape):
            continue  # not the parameter as the trace laid it out: left as it is (float)
        dtype = value.dtype

        def tensor(a, ir_dtype):
            return ir.Value(name="", shape=ir.Shape(a.shape), type=ir.TensorType(ir_dtype),
                            const_value=ir.tensor(np.ascontiguousarray(a), dtype=ir_dtype))

        base = name[:-2] if transposed else name
        qv = tensor(_numpy(q), ir.DataType.FLOAT8E4M3FN)
        sv = tensor(_numpy(scale, np_dtype[dtype]), dtype)
        qv.name, sv.name = f"{name}.fp8.q", f"{name}.fp8.scale"
        graph.register_initializer(qv)
        graph.register_initializer(sv)
        attrs = [ir.AttrInt64("axis", axis)] + ([ir.AttrInt64("block_size", block)] if block else [])
        dq = ir.Node("", "DequantizeLinear", [qv, sv], attributes=attrs, name=f"{base}/checkpoint_fp8")
        users = [u.node for u in value.uses()]
        graph.insert_before(min(users, key=lambda n: _position(graph, n)), dq)
        out = dq.outputs[0]
        out.dtype, out.shape = dtype, ir.Shape(value.shape)
        value.replace_all_uses_with(out)
        graph.initializers.pop(name)
        out.name = name  # the weight keeps its name: the optimize stage finds it by it
        kept += 1
    if kept:
        ensure_opset(onnx_model, DQ_OPSET, "keep_fp8_weights", "DequantizeLinear (blocked)", None, True)
    return kept


def sidecar_record(checkpoint_dir, weights: int) -> dict:
    """What the export's sidecar (and so the optimize stage's and the manifest) says about the
    FP8 weights it kept."""
    from moec.models.checkpoint import inspect_checkpoint

    qc = inspect_checkpoint(checkpoint_dir).quantization
    return FORMAT_RECORD | {"source": "checkpoint", "weights": weights, **qc.record()}
