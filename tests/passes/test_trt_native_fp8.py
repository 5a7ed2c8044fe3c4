"""trt-native with FP8 experts (passes/lowerings/trt_native.py): fires (TRT_MoE with DequantizeLinear
E4M3 weights and, with a calibrated down_proj input scale, quantization_mode 1 / quantization_dtype 6
and the scale as input 9), must not fire (int4 / int8 / nvfp4 experts refused by name), TensorRT-RTX's
parser reads the layer's quantization back, and same numbers: the graph around TRT_MoE on ONNX
Runtime with the op itself computed in NumPy (IMoELayer's arithmetic) equals the dense lowering of
the same quantized graph. No engine: IMoELayer builds for SM100+ only, which TensorRT-RTX does not
target, and full TensorRT does not install here."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from conftest import block_input, ort_run, rel_err

from moec.common.errors import MoecError
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.passes.fusions.grouped_experts import fuse_grouped_experts
from moec.passes.fusions.moe_gating import fuse_moe_gating
from moec.passes.lowerings import lower_moe
from moec.passes.lowerings.trt_native import DOWN_SCALE_ATTR, TRT_DTYPE_FP8, TRT_QUANT_STATIC
from moec.passes.quantize import QuantizeSpec, make_spec
from moec.passes.quantize.apply import quantize_weights
from moec.passes.quantize.fp8 import E4M3_MAX

sys.path.insert(0, str(Path(__file__).parents[1]))
from moec_cli import run_cli  # noqa: E402

FP8 = ir.DataType.FLOAT8E4M3FN


def quantized_block(block_onnx, fmt: str = "fp8", down_scale: float | None = None, dtype: str = "fp32") -> ir.Model:
    """The ref_k1 block fused and its experts quantized; ``down_scale`` set on the experts node as
    fp8_act.py sets it for --quantize-activations static."""
    model = ir.load(block_onnx("ref_k1", dtype))
    assert fuse_moe_gating(model) == 1 and fuse_grouped_experts(model) == 1
    # int4 in blocks of 8: the block's K (16, 24) is shorter than any group the CLI offers.
    spec = QuantizeSpec("int4", group=8) if fmt == "int4" else make_spec(fmt)
    assert quantize_weights(model, spec) == 2
    if down_scale is not None:
        (experts,) = [n for n in model.graph if n.op_type == "GroupedExperts"]
        experts.attributes[DOWN_SCALE_ATTR] = ir.AttrFloat32(DOWN_SCALE_ATTR, down_scale)
    return model


def _trt_moe(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "TRT_MoE"]


def _dequantized_input(value: ir.Value) -> ir.DataType | None:
    node = value.producer()
    return node.inputs[0].dtype if node is not None and node.op_type == "DequantizeLinear" else None


def _constant(value: ir.Value) -> np.ndarray:
    node = value.producer()
    assert node is not None and node.op_type == "Constant", value.name
    return node.attributes["value"].value.numpy()


@pytest.mark.parametrize("down_scale", [None, 0.05])
def test_fires_on_fp8_experts(block_onnx, down_scale):
    model = quantized_block(block_onnx, down_scale=down_scale)
    assert lower_moe(model, ["trt-native", "hybrid"], "trt:sm100") == {"trt-native": 1}
    (moe,) = _trt_moe(model)
    assert [_dequantized_input(v) for v in moe.inputs[3:6]] == [FP8] * 3  # gate, up, down
    gate_scale = moe.inputs[3].producer().inputs[1]
    assert list(gate_scale.shape) == [4, 1, 24]  # one scale per expert and output channel of the gate half
    attrs = {k: a.value for k, a in moe.attributes.items()}
    if down_scale is None:
        assert len(moe.inputs) == 6 and "quantization_mode" not in attrs
    else:
        assert attrs["quantization_mode"] == TRT_QUANT_STATIC and attrs["quantization_dtype"] == TRT_DTYPE_FP8
        assert len(moe.inputs) == 10 and moe.inputs[6:9] == (None, None, None)
        assert _constant(moe.inputs[9]) == np.float32(down_scale)


@pytest.mark.parametrize("fmt,name", [("int4", "INT4"), ("int8", "INT8")])
def test_must_not_fire_on_int_experts(block_onnx, fmt, name):
    with pytest.raises(MoecError, match=f"trt:sm100.*{name}: TRT_MoE .* takes float or FP8"):
        lower_moe(quantized_block(block_onnx, fmt), ["trt-native"], "trt:sm100")
    # The target's default order falls back to hybrid over the DequantizeLinear weights.
    model = quantized_block(block_onnx, fmt)
    assert lower_moe(model, ["trt-native", "hybrid"], "trt:sm100") == {"hybrid": 1} and not _trt_moe(model)


@pytest.mark.parametrize("args", [["--quantize", "int4", "--quantize-group", "32"], ["--quantize", "int8"],
                                  ["--quantize", "nvfp4"]])
def test_optimize_refuses_non_fp8_experts_on_trt_native_by_name(demo_onnx, tmp_path, capsys, args):
    out = tmp_path / "q" / "model.onnx"
    code, _, err = run_cli(["optimize", demo_onnx, "-o", out, "--target", "trt:sm100", "--moe-lowering",
                            "trt-native", *args], capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--moe-lowering trt-native" in err and "FP8 only" in err and f"not {args[1]} experts" in err
    assert not out.parent.exists()


def test_demo_pipeline_emits_quantized_trt_moe(demo_onnx, tmp_path):
    """--quantize fp8 --quantize-activations static on trt:sm100: both MoE layers become TRT_MoE
    with FP8 weights, the hidden state's Q/DQ before them and the calibrated down input scale."""
    out = tmp_path / "model.onnx"
    report = optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt:sm100", quantize="fp8",
                                                          quantize_activations="static"))
    assert report.moe_lowering == {"trt-native": 2}
    model = ir.load(out)
    moes = _trt_moe(model)
    assert len(moes) == 2 and Counter(n.domain for n in model.graph)["moec"] == 0
    for moe in moes:
        assert [_dequantized_input(v) for v in moe.inputs[3:6]] == [FP8] * 3
        assert moe.attributes["quantization_mode"].value == TRT_QUANT_STATIC
        assert moe.attributes["quantization_dtype"].value == TRT_DTYPE_FP8
        scale = float(_constant(moe.inputs[9]))
        assert 0 < scale < 1  # amax / 448 of the demo's SwiGLU products
        # Unsqueeze(Mul(DequantizeLinear(QuantizeLinear(x)), score)): W8A8 on the hidden state.
        mul = moe.inputs[0].producer().inputs[0].producer()
        assert mul.op_type == "Mul" and any(v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                                            for v in mul.inputs)
    weight_only = optimize_onnx(demo_onnx, tmp_path / "w" / "model.onnx", OptimizeConfig(target="trt:sm100",
                                                                                       quantize="fp8"))
    assert weight_only.moe_lowering == {"trt-native": 2}
    assert all(len(m.inputs) == 6 for m in _trt_moe(ir.load(tmp_path / "w" / "model.onnx")))


def _parsed_moe_layers(model: ir.Model | Path):
    """TensorRT-RTX's parser on ``model``: each IMoELayer with the layer types feeding its inputs."""
    trt = pytest.importorskip("tensorrt_rtx")
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(model)) if isinstance(model, Path) else \
        parser.parse(ir.serde.serialize_model(model).SerializeToString())
    assert ok, [parser.get_error(i).desc() for i in range(parser.num_errors)]
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer = {lay.get_output(j).name: lay.type for lay in layers for j in range(lay.num_outputs)}
    out = []
    for lay in layers:
        if lay.type == trt.LayerType.MOE:
            lay.__class__ = trt.IMoELayer
            feeds = [producer.get(lay.get_input(j).name) if lay.get_input(j) is not None else None
                     for j in range(lay.num_inputs)]
            out.append((lay, feeds))
    return trt, out


@pytest.mark.trt
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("down_scale", [None, 0.05])
def test_parser_reads_back_a_quantized_imoelayer(block_onnx, down_scale, dtype):
    """fp16 too: the gating's fp32 scores are cast to the hidden state's dtype before they scale it
    (TensorRT refuses a Mul of Half and Float)."""
    model = quantized_block(block_onnx, down_scale=down_scale, dtype=dtype)
    lower_moe(model, ["trt-native"], "trt:sm100")
    trt, ((layer, feeds),) = _parsed_moe_layers(model)
    assert feeds[3:6] == [trt.LayerType.DEQUANTIZE] * 3
    if down_scale is None:
        assert layer.quantization_to_type == trt.DataType.FLOAT and layer.num_inputs == 6
    else:
        assert layer.quantization_to_type == trt.DataType.FP8 and layer.num_inputs == 10
        assert feeds[6:9] == [None] * 3 and feeds[9] == trt.LayerType.CONSTANT


@pytest.mark.trt
def test_parser_reads_back_the_demo_pipeline_graph(demo_onnx, tmp_path):
    out = tmp_path / "model.onnx"
    optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt:sm100", quantize="fp8", quantize_activations="static"))
    trt, moes = _parsed_moe_layers(out)
    assert len(moes) == 2
    assert all(lay.quantization_to_type == trt.DataType.FP8 and lay.num_inputs == 10 for lay, _ in moes)


# ---- same numbers: TRT_MoE replaced by its arithmetic in NumPy ----------------------------------

def trt_moe_reference(x_BSH, ids_BSK, scores_BSK, gate_EHI, up_EHI, down_EIH, down_scale=None):
    """IMoELayer: per token and chosen expert, scores * (SiLU(x @ gate) * (x @ up)) @ down, the mul
    output quantized statically to E4M3 (saturating) when a down input scale is given."""
    x_TH = x_BSH.reshape(-1, x_BSH.shape[-1]).astype(np.float32)
    ids_TK, scores_TK = ids_BSK.reshape(x_TH.shape[0], -1), scores_BSK.reshape(x_TH.shape[0], -1)
    out = np.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for e, s in zip(ids_TK[t], scores_TK[t]):
            g, u = x_TH[t] @ gate_EHI[e], x_TH[t] @ up_EHI[e]
            a = g / (1 + np.exp(-g)) * u
            if down_scale is not None:
                q = np.clip(a / down_scale, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
                a = q.astype(np.float32) * np.float32(down_scale)
            out[t] += s * (a @ down_EIH[e])
    return out.reshape(x_BSH.shape)


def trt_moe_cut(model: ir.Model, feeds: dict):
    """The graph on ONNX Runtime with its one TRT_MoE cut out: (the op's input arrays from a first
    run, a function running the rest of the graph on the op's output)."""
    model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    (moe,) = _trt_moe(model)
    graph = model.graph
    y = ir.Value(name="trt_moe_out", type=ir.TensorType(ir.DataType.FLOAT), shape=moe.outputs[0].shape)
    moe.outputs[0].replace_all_uses_with(y)
    graph.inputs.append(y)
    ins = list(moe.inputs)
    graph.remove(moe, safe=True)
    wanted = [v for v in ins if v is not None and v.const_value is None]
    graph.outputs.extend(wanted)
    n_out = len(graph.outputs) - len(wanted)
    t, h = feeds["x"].shape[0] * feeds["x"].shape[1], feeds["x"].shape[2]
    first = ort_run(model, {**feeds, "trt_moe_out": np.zeros((1, t, h), np.float32)})
    got = dict(zip((v.name for v in wanted), first[n_out:]))
    args = [None if v is None else v.const_value.numpy() if v.const_value is not None else got[v.name] for v in ins]
    return args, lambda y_1TH: ort_run(model, {**feeds, "trt_moe_out": y_1TH.astype(np.float32)})[0]


def run_with_numpy_trt_moe(model: ir.Model, feeds: dict) -> np.ndarray:
    args, rest = trt_moe_cut(model, feeds)
    return rest(trt_moe_reference(*args[:6], down_scale=None if len(args) < 10 else float(args[9])))


def _dense_with_down_qdq(block_onnx, down_scale: float | None) -> ir.Model:
    """The same quantized graph through the dense lowering, with (for a scale) an E4M3 Q/DQ on the
    down projection's input: the arithmetic TRT_MoE's static quantization stands for."""
    from moec.passes.quantize.fp8_act import _insert_qdq

    model = quantized_block(block_onnx)
    assert lower_moe(model, ["dense"], "trt:sm100") == {"dense": 1}
    if down_scale is not None:
        (down_mm,) = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].producer() is not None
                      and n.inputs[1].producer().op_type == "DequantizeLinear" and "down_proj" in n.inputs[1].name]
        down_mm.inputs[0].dtype = ir.DataType.FLOAT  # untyped until shape inference
        _insert_qdq(model.graph, down_mm, np.float32(down_scale), np.float32, "down_proj")
    return model


@pytest.mark.parametrize("with_scale", [False, True])
def test_same_numbers_as_the_dense_lowering(block_onnx, with_scale):
    feeds = block_input()
    # Weight-only: the quantized fused graph's own numbers (its moec function bodies on ONNX Runtime).
    float_out = ort_run(quantized_block(block_onnx), feeds)[0]
    assert rel_err(run_with_numpy_trt_moe(_lowered(block_onnx, None), feeds), float_out) < 1e-5
    if not with_scale:
        return
    # A scale that saturates nothing, as calibration picks it: amax / 448 of these rows' SwiGLU products.
    scale = _swiglu_amax(block_onnx, feeds) / E4M3_MAX
    got = run_with_numpy_trt_moe(_lowered(block_onnx, scale), feeds)
    want = ort_run(_dense_with_down_qdq(block_onnx, scale), feeds)[0]
    assert rel_err(got, want) < 1e-5
    # The check can fail: the FP8 down input moves the output well beyond that.
    assert rel_err(got, float_out) > 1e-3


def _lowered(block_onnx, down_scale):
    model = quantized_block(block_onnx, down_scale=down_scale)
    assert lower_moe(model, ["trt-native"], "trt:sm100") == {"trt-native": 1}
    return model


def _swiglu_amax(block_onnx, feeds) -> float:
    """max |SiLU(x @ gate) * (x @ up)| over the routed rows, from TRT_MoE's own inputs."""
    (x, ids, _, gate, up, _), _ = trt_moe_cut(_lowered(block_onnx, None), feeds)
    x_TH, ids_T = x.reshape(-1, x.shape[-1]), ids.reshape(-1)  # k = 1
    g, u = np.einsum("th,thi->ti", x_TH, gate[ids_T]), np.einsum("th,thi->ti", x_TH, up[ids_T])
    return float(np.abs(g / (1 + np.exp(-g)) * u).max())
