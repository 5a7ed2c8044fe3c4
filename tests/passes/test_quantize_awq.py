"""Calibrated quantization: AWQ-like int4 scales (passes/quantize/awq.py) and FP8 W8A8 activations
(passes/quantize/fp8_act.py). Fires (the Muls / Q-DQ pairs and the sidecar record), must not fire
(uncalibrated methods add neither), same numbers (ONNX Runtime on the quantized graph equals the
export with the same dequantized weights and scales; a one-MatMul graph equals NumPy), and the
bad inputs calibration can meet are named before any pass runs."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from moec.common.errors import MoecError
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.passes.quantize import dequantize, make_spec
from moec.passes.quantize.apply import find_weights, quantize_weights
from moec.passes.quantize.awq import AWQ_ALPHAS, search_alpha
from moec.passes.quantize.calibrate import Calibration

sys.path.insert(0, str(Path(__file__).parent))
from conftest import demo_feeds, ort_run, rel_err  # noqa: E402
from quant_reference import dequantized_weights, optimize_dq_form  # noqa: E402

CASES = {"awq": dict(quantize="int4", quantize_group=32, quantize_method="awq"),
         "awq-asym": dict(quantize="int4", quantize_group=32, quantize_method="awq", quantize_symmetric=False),
         "w8a8": dict(quantize="fp8", quantize_activations="static")}


@pytest.fixture(scope="module")
def optimized(demo_onnx, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("calibrated"), {}

    def get(case: str, target: str = "ort") -> Path:
        if (case, target) not in cache:
            out = root / f"{case}_{target.replace(':', '_')}" / "model.onnx"
            optimize_dq_form(demo_onnx, out, OptimizeConfig(target=target, quantize_scope="all", **CASES[case]))
            cache[(case, target)] = out
        return cache[(case, target)]

    return get


def _k_axes(export: ir.Model) -> dict[str, int]:
    out = {}
    for node in export.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None \
                and node.inputs[1].const_value is not None:
            w = node.inputs[1]
            trans = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].value
            out[w.name] = 1 if (trans or len(w.shape) == 3) else 0
    return out


def awq_reference(export_path: Path, quantized: ir.Model) -> ir.Model:
    """The export with every weight replaced by dq(q) / s: the dequantized weight the quantized
    graph holds, divided along K by the scale its awq Mul divides the input by (the experts' down
    scales are folded into the up columns, which dq(q) already holds)."""
    weights = dequantized_weights(quantized)
    inits = quantized.graph.initializers
    model = ir.load(export_path)
    axes = _k_axes(model)
    for name, w in weights.items():
        inv = inits.get(f"{name}.awq0.inv_scale")
        if inv is not None:
            shape = [1] * w.ndim
            shape[axes[name]] = -1
            w = w * inv.const_value.numpy().astype(np.float32).reshape(shape)
        model.graph.initializers[name].const_value = ir.tensor(w.astype(np.float32))
    return model


def test_awq_fires_a_mul_per_scaled_input_and_records_the_calibration(optimized):
    path = optimized("awq", "trt-rtx:sm89")
    graph = ir.load(path).graph
    muls = [n for n in graph if n.name.endswith("/scale_input")]
    dqs = [n for n in graph if n.op_type == "DequantizeLinear"]
    # One per quantized weight, but the experts' down (folded into the up columns): 2 MoE layers.
    assert len(muls) == len(dqs) - 2 and len(muls) > 10
    quant = json.loads((path.parent / "model.moec.json").read_text())["quantization"]
    assert quant["method"] == "awq" and quant["calibration"].startswith("calibration.txt (")


@pytest.mark.parametrize("case", ["awq", "awq-asym"])
@pytest.mark.parametrize("past,new", [(0, 6), (5, 1)])
def test_awq_same_numbers_as_the_scaled_dequantized_reference(demo_onnx, optimized, case, past, new):
    trt_graph = optimized(case, "trt-rtx:sm89")
    reference = awq_reference(demo_onnx, ir.load(trt_graph))
    feeds = demo_feeds(demo_onnx, past, new)
    want = ort_run(reference, feeds)
    for graph in (optimized(case), trt_graph):  # ort: QMoE + MatMulNBits; trt-rtx: DequantizeLinear
        got = ort_run(graph, feeds)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-5, (graph.parent.name, rel_err(g, w))
    assert rel_err(ort_run(demo_onnx, feeds)[0], want[0]) > 1e-3  # the check can fail


def test_awq_search_never_loses_to_no_scaling():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 96)).astype(np.float32) * np.exp(rng.standard_normal(96)).astype(np.float32)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    s, alpha, base, loss = search_alpha(w, x, np.abs(x).mean(0), 32, True)
    assert 0 in AWQ_ALPHAS and loss <= base and alpha > 0  # outlier channels: scaling pays here
    assert s.shape == (96,) and np.isclose(np.exp(np.log(s).mean()), 1.0, rtol=0.2)


def _one_matmul(k: int = 64, n: int = 48) -> ir.Model:
    rng = np.random.default_rng(3)
    x = ir.Value(name="x", shape=ir.Shape(["T", k]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="model.layers.0.feed_forward.up_proj.weight.T", shape=ir.Shape([k, n]),
                 type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(rng.standard_normal((k, n)).astype(np.float32)))
    node = ir.Node("", "MatMul", [x, w])
    node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape(["T", n])
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_fp8_static_activations_equal_numpy():
    model = _one_matmul()
    w = model.graph.initializers["model.layers.0.feed_forward.up_proj.weight.T"].const_value.numpy().copy()
    x_cal = np.random.default_rng(4).standard_normal((32, 64)).astype(np.float32)
    spec = make_spec("fp8", scope="mlp", activations="static")
    calib = Calibration("test", 32, {"model.layers.0.feed_forward.up_proj.weight": x_cal})
    assert quantize_weights(model, spec, calibration=calib) == 1
    ops = Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 2
    x = np.random.default_rng(5).standard_normal((7, 64)).astype(np.float32) * 1.5  # some beyond the amax
    got = ort_run(model, {"x": x})[0]
    s = np.float32(np.abs(x_cal).max() / 448)
    x8 = np.clip(x / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
    wq = dequantize(spec.quantize(w, 0, 64))
    want = x8 @ wq
    assert rel_err(got, want) < 1e-5
    assert rel_err(x @ wq, want) > 1e-3  # the activations are really rounded


def test_w8a8_fires_qdq_on_every_fp8_weight_input(optimized):
    path = optimized("w8a8", "trt-rtx:sm89")
    graph = ir.load(path).graph
    qs = [n for n in graph if n.op_type == "QuantizeLinear"]
    assert qs and all(n.outputs[0].dtype == ir.DataType.FLOAT8E4M3FN for n in qs)
    quant = json.loads((path.parent / "model.moec.json").read_text())["quantization"]
    assert quant["activations"] == "fp8 e4m3 static per-tensor" and quant["calibration"].startswith("calibration.txt")
    feeds = demo_feeds(path, 0, 6)
    got, ref = ort_run(path, feeds)[0], ort_run(optimized("w8a8"), feeds)[0]
    assert np.isfinite(got).all() and rel_err(got, ref) < 1e-5  # ort and trt-rtx graphs: the same arithmetic


@pytest.mark.parametrize("method", ["rtn", "clip"])
def test_must_not_fire_without_calibration(demo_onnx, tmp_path, method):
    out = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt-rtx:sm89", quantize="int4", quantize_group=32,
                                                     quantize_scope="all", quantize_method=method))
    graph = ir.load(out).graph
    assert not [n for n in graph if n.name.endswith("/scale_input") or n.op_type == "QuantizeLinear"]
    quant = json.loads((out.parent / "model.moec.json").read_text())["quantization"]
    assert quant["method"] == method and quant["calibration"].startswith("none")


def test_calibration_without_a_tokenizer_is_named(demo_onnx, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in demo_onnx.parent.iterdir():
        if f.name != "tokenizer.json":
            shutil.copy(f, bare / f.name)
    with pytest.raises(MoecError, match="calibration tokenizes calibration.txt with the model's tokenizer.json"):
        optimize_onnx(bare / demo_onnx.name, tmp_path / "out" / "model.onnx",
                      OptimizeConfig(target="ort", quantize="int4", quantize_group=32, quantize_method="awq"))
    assert not (tmp_path / "out").exists()


def test_too_short_calibration_text_is_named(demo_onnx, tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("hi")
    with pytest.raises(MoecError, match="calibration needs at least 16"):
        optimize_onnx(demo_onnx, tmp_path / "out" / "model.onnx",
                      OptimizeConfig(target="ort", quantize="fp8", quantize_activations="static",
                                     quantize_calibration=str(text)))


def test_partitioned_pipeline_without_calibration_is_named(demo_onnx):
    model = ir.load(demo_onnx)
    spec = make_spec("int4", 32, "all", method="awq")
    assert find_weights(model, spec)
    with pytest.raises(MoecError, match="calibrates on the export"):
        quantize_weights(model, spec)
