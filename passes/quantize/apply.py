"""quantize_weights: the weights a scope names -> DequantizeLinear(q, scale[, zero_point]).

Runs on the fused graph, after precision and before lowering. Every lowering then meets the same
standard-ONNX form, a DequantizeLinear (opset 21: int4 and blocked scales) on the weight input of
moec.GroupedExperts, MatMul or Gemm:
- the ``ort`` lowerings turn it into MatMulNBits (dense, and per expert in split.py) or
  com.microsoft.QMoE (lowerings/ort_quant.py);
- gather, dense and hybrid take it as it is: TensorRT fuses DQ -> MatMul into a quantized GEMM
  and keeps the weights in their quantized type.
nvfp4 (opset 23, IR 11) is two of them: DequantizeLinear(E4M3 block scales, fp32 global scale)
[-> Cast to the weight's fp16 / bf16], then DequantizeLinear(E2M1 values, those scales; axis K,
block_size 16), the form TensorRT reads as NVFP4 weights (TensorRT targets only:
compiler/quantize_stage.py).

The quantized tensors are computed lazily, once per weight, while the output is written (like the
lowerings' relaid weights), so a large model is never held twice in memory. Every check that can
refuse (a group longer than K, a scope that names nothing) runs before any weight is
read.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from moec.common.contract import MOEC_DOMAIN, OP_GROUPED_EXPERTS, QUANT_DYNAMIC_KEY
from moec.common.errors import MoecError
from moec.passes.fusions._graph import FusionLog, ensure_opset
from moec.passes.quantize import AWQ_METHODS, GPTQ_METHODS, SCOPES, STATIC_ACTIVATIONS, WEIGHT_KINDS, QuantizeSpec
from moec.passes.quantize._base import QTensor, num_blocks

NAME = "quantize_weights"
DQ_OPSET = 21  # DequantizeLinear with block_size, int4/uint4 and float8 zero points
FP4_OPSET = 23  # DequantizeLinear of FLOAT4E2M1 (nvfp4)
FP4_IR_VERSION = 11  # the IR version that has FLOAT4E2M1
_FLOAT = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@dataclasses.dataclass(frozen=True)
class WeightSite:
    """One weight to quantize: the initializer, the node input(s) it feeds, its reduction axis."""

    value: ir.Value
    uses: tuple[tuple[ir.Node, int], ...]
    axis: int  # K: the axis the product sums over
    kind: str  # "experts" | "mlp" | "attention"


def _k_axis(node: ir.Node, idx: int, rank: int) -> int | None:
    if node.domain == MOEC_DOMAIN and node.op_type == OP_GROUPED_EXPERTS and idx in (3, 4):
        return 1  # w_gate_up_EHI2 sums over H, w_down_EIH over I
    if node.domain in ("", "ai.onnx") and idx == 1 and rank == 2:
        if node.op_type == "MatMul":
            return 0
        if node.op_type == "Gemm":
            trans = node.attributes.get("transB")
            return 1 if trans is not None and trans.value else 0
    return None


def find_weights(model: ir.Model, spec: QuantizeSpec, log: FusionLog | None = None) -> list[WeightSite]:
    """The weights ``spec.scope`` names, each with the node inputs it feeds."""
    kinds = SCOPES[spec.scope]
    sites: list[WeightSite] = []
    for value in model.graph.initializers.values():
        if value.const_value is None or value.dtype not in _FLOAT_DTYPES or value.shape is None:
            continue
        uses = [(u.node, u.idx) for u in value.uses()]
        if any(n.domain == MOEC_DOMAIN and n.op_type == OP_GROUPED_EXPERTS for n, _ in uses):
            kind = "experts"
        else:
            name = value.name.removesuffix(".T")
            kind = next((k for k, pattern in WEIGHT_KINDS.items() if pattern.search(name)), None)
        if kind is None or kind not in kinds:
            continue
        axes = {_k_axis(n, i, len(value.shape)) for n, i in uses}
        if not uses or None in axes or len(axes) != 1:
            if log is not None:
                log.refuse(NAME, uses[0][0] if uses else None,
                           f"{value.name}: feeds {', '.join(sorted({n.op_type for n, _ in uses}))}, not only the "
                           "weight input of MatMul / Gemm / GroupedExperts; kept in full precision")
            continue
        sites.append(WeightSite(value, tuple(uses), axes.pop(), kind))
    return sites


_FLOAT_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def check_sites(sites: list[WeightSite], spec: QuantizeSpec, what: str, whole_blocks: bool = False) -> None:
    """Named errors, before any weight is read: nothing in scope, a group longer than a K, and,
    with ``whole_blocks`` (TensorRT's parser), a group that does not divide a K (elsewhere the
    last block is shorter)."""
    if not sites:
        others = [s for s in SCOPES if s != spec.scope]
        raise MoecError(f"--quantize-scope {spec.scope} names no weight in {what} (it quantizes "
                        f"{', '.join(SCOPES[spec.scope])} weights; a model without fused MoE layers has no routed "
                        f"experts); use --quantize-scope {' or '.join(others)}")
    for site in sites:
        k = int(site.value.shape[site.axis])
        if spec.block_for(k) > k:
            raise MoecError(f"--quantize-group {spec.group} is longer than {site.value.name}'s reduction dimension "
                            f"({k}, axis {site.axis} of {list(site.value.shape)}); choose a group of at most the "
                            "smallest K of the scope")
        if whole_blocks and k % spec.block_for(k):
            raise MoecError(group_does_not_divide(spec, site.value.name, k, [int(t.value.shape[t.axis]) for t in sites]))


def group_does_not_divide(spec: QuantizeSpec, weight: str, k: int, ks) -> str:
    from moec.passes.quantize.int4 import GROUPS

    fits = [g for g in GROUPS if all(x % g == 0 for x in ks)]
    choice = (f"use --quantize-group {max(fits)} (it divides every K of the scope), or" if fits else
              f"no group of {', '.join(map(str, GROUPS))} divides every K of the scope ({', '.join(map(str, sorted(set(ks))))}):")
    return (f"--quantize-group {spec.group} does not divide {weight}'s reduction dimension {k}, and TensorRT's "
            f"DequantizeLinear takes whole blocks only: {choice} target ort (which takes a shorter last block)")


class _Quantized:
    """One weight's QTensor, computed on the first read of any of its parts and dropped after the
    last, so writing q, scale and zero point reads and quantizes the source once."""

    def __init__(self, source: ir.TensorProtocol, spec: QuantizeSpec, axis: int, parts: int, importance=None,
                 hessian=None):
        self._source, self._spec, self._axis, self._parts = source, spec, axis, parts
        self._importance, self._hessian = importance, hessian
        self._qt: QTensor | None = None
        self._reads = 0

    def part(self, name: str) -> np.ndarray:
        if self._qt is None:
            w = self._source.numpy().astype(np.float32)
            k = w.shape[self._axis]
            h = None if self._hessian is None else self._hessian()
            self._qt = self._spec.quantize(w, self._axis, self._spec.block_for(k), self._importance, h)
        out = getattr(self._qt, name)
        self._reads += 1
        if self._reads >= self._parts:
            self._qt, self._reads = None, 0
        return out


def _storage_array(q: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    import ml_dtypes

    return {ir.DataType.INT4: lambda: q.astype(ml_dtypes.int4), ir.DataType.UINT4: lambda: q.astype(ml_dtypes.uint4),
            ir.DataType.INT8: lambda: q.astype(np.int8), ir.DataType.FLOAT8E4M3FN: lambda: q,
            ir.DataType.FLOAT4E2M1: lambda: q}[dtype]()


def _scale_array(scale: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    if dtype == ir.DataType.BFLOAT16:
        import ml_dtypes

        return scale.astype(ml_dtypes.bfloat16)
    return scale.astype(_FLOAT[dtype])


def quantize_site(graph: ir.Graph, site: WeightSite, spec: QuantizeSpec, importance=None, hessian=None) -> ir.Value:
    """Replace the weight's uses by a DequantizeLinear of new (lazy) quantized initializers
    (``importance``: awq's weights of the clipping error, broadcast on the weight; ``hessian``: a
    function returning gptq's H, called when the weight is quantized)."""
    w = site.value
    shape = tuple(int(d) for d in w.shape)
    k = shape[site.axis]
    block = spec.block_for(k)
    storage = spec.fmt.storage(spec.symmetric)
    has_zp = not spec.symmetric
    two_level = spec.format == "nvfp4"
    cache = _Quantized(w.const_value, spec, site.axis, 3 if has_zp or two_level else 2, importance, hessian)
    blocked_shape = tuple(num_blocks(d, block) if i == site.axis else d for i, d in enumerate(shape))
    # A 2D weight with one scale per output channel is DequantizeLinear's per-axis form (1D scales
    # on the output axis), which every runtime and parser takes; everything else is blocked on K.
    per_axis = len(shape) == 2 and spec.fmt.granularity == "channel"
    out_axis = 1 - site.axis
    scale_shape = (shape[out_axis],) if per_axis else blocked_shape

    def lazy(name: str, dtype: ir.DataType, shape_, convert):
        tensor = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(convert(cache.part(name)).reshape(shape_)),
                                                 dtype=dtype), dtype=dtype, shape=ir.Shape(shape_))
        value = ir.Value(name=f"{w.name}.{spec.label()}.{name}", shape=ir.Shape(shape_), type=ir.TensorType(dtype),
                         const_value=tensor)
        graph.register_initializer(value)
        return value

    q = lazy("q", storage, shape, lambda a: _storage_array(a, storage))
    first = min((n for n, _ in site.uses), key=lambda n: _position(graph, n))
    if two_level:
        # NVFP4: the E4M3 block scales dequantized by the fp32 global scale, then the E2M1 values by
        # those (the form TensorRT reads as NVFP4 weights). The block scales leave the first
        # DequantizeLinear in fp32 and are cast to the weight's dtype where it is fp16 / bf16.
        block_scale = lazy("scale", ir.DataType.FLOAT8E4M3FN, scale_shape, lambda a: a)
        global_ = lazy("global_scale", ir.DataType.FLOAT, (), lambda a: np.asarray(a, np.float32))
        dq_scale = ir.Node("", "DequantizeLinear", [block_scale, global_], name=f"{w.name}/dequantize_{spec.label()}_scale")
        scale = dq_scale.outputs[0]
        scale.name, scale.dtype, scale.shape = f"{w.name}.{spec.label()}.scale_fp32", ir.DataType.FLOAT, ir.Shape(scale_shape)
        graph.insert_before(first, dq_scale)
        if w.dtype != ir.DataType.FLOAT:
            cast = ir.Node("", "Cast", [scale], attributes=[ir.AttrInt64("to", w.dtype)],
                           name=f"{w.name}/dequantize_{spec.label()}_scale_cast")
            scale = cast.outputs[0]
            scale.name, scale.dtype, scale.shape = f"{w.name}.{spec.label()}.scale_{w.dtype.name.lower()}", w.dtype, ir.Shape(scale_shape)
            graph.insert_before(first, cast)
    else:
        scale = lazy("scale", w.dtype, scale_shape, lambda a: _scale_array(a, w.dtype))
    inputs = [q, scale]
    if has_zp:
        inputs.append(lazy("zero_point", storage, scale_shape, lambda a: _storage_array(a, storage)))
    attrs = [ir.AttrInt64("axis", out_axis if per_axis else site.axis)]
    if not per_axis:
        attrs.append(ir.AttrInt64("block_size", block))
    dq = ir.Node("", "DequantizeLinear", inputs, attributes=attrs, name=f"{w.name}/dequantize_{spec.label()}")
    if spec.activations == "dynamic":
        # Read by the ort lowerings (MatMulNBits accuracy_level 4); a DequantizeLinear left as it is
        # ignores it.
        dq.metadata_props[QUANT_DYNAMIC_KEY] = "int8"
    out = dq.outputs[0]
    out.name, out.dtype, out.shape = f"{w.name}.{spec.label()}", w.dtype, ir.Shape(shape)
    graph.insert_before(first, dq)
    for node, idx in site.uses:
        node.replace_input_with(idx, out)
    return out


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    return len(graph)


def quantize_weights(model: ir.Model, spec: QuantizeSpec, log: FusionLog | None = None, what: str = "the model",
                     whole_blocks: bool = False, calibration=None) -> int:
    """Quantize every weight ``spec`` names; returns how many. Unused originals are removed by the
    clean-up that follows (they are no longer read). ``whole_blocks``: see check_sites.
    ``calibration`` (calibrate.Calibration): what awq, gptq and FP8 activations read."""
    # The opset first, the sites after: the upgrade may replace nodes, and a site holds its uses.
    if spec.format == "nvfp4":
        ensure_opset(model, FP4_OPSET, NAME, "DequantizeLinear (FLOAT4E2M1)", log, True)
        model.ir_version = max(model.ir_version or 0, FP4_IR_VERSION)
    else:
        ensure_opset(model, DQ_OPSET, NAME, "DequantizeLinear (blocked, int4)", log, True)
    sites = find_weights(model, spec, log)
    check_sites(sites, spec, what, whole_blocks)
    if spec.calibrated and calibration is None:
        raise MoecError(f"--quantize {spec.label()} calibrates on the export, and this pipeline has none to run "
                        "(moec optimize of a single graph calibrates; --tp/--ep partitions do not yet)")
    importance, scales, hessians = {}, {}, {}
    if spec.method in AWQ_METHODS:
        from moec.passes.quantize.awq import apply_awq

        importance, scales = apply_awq(model, sites, spec, calibration, log)
    if spec.method in GPTQ_METHODS:  # awq-gptq: the Hessians of the scaled rows x / s
        from moec.passes.quantize.gptq import site_hessians

        hessians = site_hessians(sites, calibration, scales, log)
    if spec.activations in STATIC_ACTIVATIONS:
        from moec.passes.quantize.fp8_act import add_fp8_activations

        add_fp8_activations(model, sites, calibration, log, skip_down=spec.activations == "static-no-down")
    from moec.passes.quantize.checkpoint_fp8 import held, restore

    for site in sites:
        if spec.format == "fp8" and held(site.value) is not None:
            restore(model.graph, site.value)  # the checkpoint's own FP8 values and scales, as they came
        else:
            quantize_site(model.graph, site, spec, importance.get(site.value.name), hessians.get(site.value.name))
    for site in sites:
        if not site.value.uses():
            model.graph.initializers.pop(site.value.name, None)
    return len(sites)
