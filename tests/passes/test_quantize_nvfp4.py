"""--quantize nvfp4: the quantizer (per-element error within half an E2M1 grid step times the
block's scale; the E4M3 block scales and the fp32 global scale as NVIDIA's NVFP4 defines them),
fires (the trt-rtx:sm120 graph has the two DequantizeLinear and FLOAT4E2M1 initializers), must
not fire (a scope without experts on an expert-only model, sm89, ort: refused by name before any
output), same numbers (ONNX Runtime 1.32's CPU provider cannot run DequantizeLinear of FLOAT4E2M1,
so the graph's initializers are decoded in NumPy, bit by bit, and compared with the quantizer's
dequantization of the export's weights), and a real TensorRT-RTX engine for sm120."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.common.errors import MoecError
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.passes.quantize import FORMATS, dequantize, make_spec
from moec.passes.quantize.nvfp4 import E2M1_VALUES, half_step

sys.path.insert(0, str(Path(__file__).parent.parent))
from moec_cli import run_cli  # noqa: E402

NVFP4 = FORMATS["nvfp4"]


def _weights(seed: int, shape, spread: float) -> np.ndarray:
    """Normal weights with a per-row magnitude spread over ``spread`` decades (blocks far smaller
    than the tensor's largest, where the E4M3 block scales get coarse)."""
    rng = np.random.default_rng(seed)
    mag = 10.0 ** rng.uniform(-spread, 0, (shape[0],) + (1,) * (len(shape) - 1))
    return (rng.standard_normal(shape) * mag).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k_blocks=st.integers(1, 6), n=st.integers(1, 9),
       spread=st.floats(0, 6), axis=st.sampled_from([0, 1]))
def test_error_within_half_a_grid_step_times_the_block_scale(seed, k_blocks, n, spread, axis):
    w = _weights(seed, (k_blocks * 16, n) if axis == 0 else (n, k_blocks * 16), spread)
    qt = NVFP4.quantize(w, axis, 16, True)
    assert qt.q.dtype == ml_dtypes.float4_e2m1fn and qt.scale.dtype == ml_dtypes.float8_e4m3fn
    err = np.abs(w - dequantize(qt))
    assert (err <= NVFP4.error_bound(w, qt) * (1 + 1e-6) + 1e-30).all()
    # The bound itself is half a step of the grid at |w| / s: where the block scale is a normal
    # E4M3 value, |w| / s stays within 6 / (1 - 2^-4) (saturating at 6 costs less than the top half step).
    s = np.repeat(qt.scale.astype(np.float32) * qt.global_scale, 16, axis=axis)
    normal = s >= 2.0**-6 * qt.global_scale
    x = np.abs(w) / np.where(s > 0, s, 1)
    assert (x[normal] <= 6 / (1 - 2.0**-4) * (1 + 1e-6)).all()
    assert (err[normal] <= s[normal] * half_step(x[normal]) * (1 + 1e-6)).all()


def test_block_and_global_scales_are_as_nvfp4_defines_them():
    w = _weights(3, (4, 64, 48), 1.0)
    qt = NVFP4.quantize(w, 1, 16, True)
    g = np.abs(w).max() / (6 * 448)
    assert qt.global_scale.dtype == np.float32 and qt.global_scale.shape == ()
    np.testing.assert_allclose(qt.global_scale, g, rtol=1e-7)
    amax = np.abs(w.reshape(4, 4, 16, 48)).max(axis=2)  # [E, K / 16, N]
    expected = (amax / 6 / np.float32(qt.global_scale)).astype(ml_dtypes.float8_e4m3fn)
    assert qt.scale.shape == (4, 4, 48)
    np.testing.assert_array_equal(qt.scale.astype(np.float32), expected.astype(np.float32))
    assert qt.scale.astype(np.float32).max() == 448.0  # the tensor's largest block
    assert set(np.unique(np.abs(qt.q.astype(np.float32)))) <= set(E2M1_VALUES)
    # A block of zeros has a zero scale and zero values; an all-zero tensor quantizes to zeros.
    z = np.zeros((32, 3), np.float32)
    z[16:, 0] = 1.0
    qz = NVFP4.quantize(z, 0, 16, True)
    assert qz.scale.astype(np.float32)[0, 0] == 0 and (dequantize(qz) == z).all()
    assert (dequantize(NVFP4.quantize(np.zeros((16, 2), np.float32), 0, 16, True)) == 0).all()


def test_spec_has_a_fixed_block_of_16_and_records_it():
    spec = make_spec("nvfp4")
    assert spec.block_for(4096) == 16 and spec.label() == "nvfp4"
    rec = spec.record()
    assert (rec["format"], rec["group_size"], rec["granularity"], rec["scope"]) == ("nvfp4", 16, "block", "experts")
    assert "e4m3" in rec["scales"] and "fp32 global" in rec["scales"]
    with pytest.raises(MoecError, match="nvfp4 has blocks of 16 by definition"):
        make_spec("nvfp4", group=32)
    with pytest.raises(MoecError, match="nvfp4 is symmetric only"):
        make_spec("nvfp4", symmetric=False)


@pytest.fixture(scope="module")
def nvfp4_sm120(demo_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("nvfp4") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt-rtx:sm120", quantize="nvfp4"))
    return out


def _fp4_initializers(model: ir.Model) -> dict[str, ir.Value]:
    return {n: v for n, v in model.graph.initializers.items() if v.dtype == ir.DataType.FLOAT4E2M1}


def test_fires_the_fp4_dequantize_pair_on_trt_rtx_sm120(nvfp4_sm120):
    model = ir.load(nvfp4_sm120)
    assert model.opset_imports[""] >= 23 and model.ir_version >= 11
    fp4 = _fp4_initializers(model)
    assert len(fp4) == 4, sorted(fp4)  # 2 MoE layers x (gate_up, down); the default scope is the experts
    assert all(".experts." in name for name in fp4)
    for value in fp4.values():
        (use,) = [u.node for u in value.uses()]
        assert use.op_type == "DequantizeLinear" and use.attributes["block_size"].value == 16
        assert use.attributes["axis"].value == 1  # K of [E, K, N]
        scale_dq = use.inputs[1].producer()
        assert scale_dq is not None and scale_dq.op_type == "DequantizeLinear"
        block_scale, global_scale = scale_dq.inputs
        assert block_scale.dtype == ir.DataType.FLOAT8E4M3FN and global_scale.dtype == ir.DataType.FLOAT
        assert global_scale.shape.dims == () and block_scale.shape[1] * 16 == value.shape[1]
    sidecar = json.loads(nvfp4_sm120.with_name("model.moec.json").read_text())["quantization"]
    assert (sidecar["format"], sidecar["group_size"], sidecar["scope"]) == ("nvfp4", 16, "experts")


def _decode_e2m1(raw: bytes, shape) -> np.ndarray:
    """FLOAT4E2M1 bytes (two a byte, low nibble first) by the table: bit 3 the sign, bits 0-2 the
    index into 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    b = np.frombuffer(raw, np.uint8)
    nib = np.stack([b & 0xF, b >> 4], axis=1).ravel()[: int(np.prod(shape))]
    mag = np.array(E2M1_VALUES, np.float32)[nib & 7]
    return np.where(nib & 8, -mag, mag).reshape(shape)


def _decode_e4m3(raw: bytes, shape) -> np.ndarray:
    """FLOAT8E4M3FN bytes: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 subnormal."""
    b = np.frombuffer(raw, np.uint8).astype(np.int32)
    e, m = (b >> 3) & 0xF, (b & 7).astype(np.float32)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * np.exp2(e - 7.0))
    return np.where(b & 0x80, -mag, mag).astype(np.float32).reshape(shape)


def test_same_numbers_graph_initializers_decode_to_the_quantizers_dequantization(demo_onnx, nvfp4_sm120):
    """ONNX Runtime 1.32 cannot run the graph (no FLOAT4E2M1 DequantizeLinear on its CPU provider),
    so the graph's weights are computed from its initializers in NumPy: e2m1 * (e4m3 * global)."""
    export = ir.load(demo_onnx)
    model = ir.load(nvfp4_sm120)
    fp4 = _fp4_initializers(model)
    for name, value in fp4.items():
        source = name.removesuffix(".nvfp4.q")
        shape = tuple(value.shape)
        q = _decode_e2m1(value.const_value.tobytes(), shape)
        scale_dq = next(iter(value.uses())).node.inputs[1].producer()
        bs, gs = scale_dq.inputs
        scale = _decode_e4m3(bs.const_value.tobytes(), tuple(bs.shape)) * np.float32(gs.const_value.numpy())
        graph_w = q * np.repeat(scale, 16, axis=1)
        w = export.graph.initializers[source].const_value.numpy().astype(np.float32)
        ref = dequantize(NVFP4.quantize(w, 1, 16, True))
        np.testing.assert_array_equal(graph_w, ref, err_msg=name)
        assert np.abs(graph_w - w).max() <= 0.25 * np.abs(w).max(), name  # and near the weights


def test_must_not_fire_where_the_scope_names_no_weight(block_onnx):
    """The experts scope on a graph without fused experts (an unfused MoE block: no
    moec.GroupedExperts) names nothing: refused by name, and no FP4 tensor is made."""
    from moec.passes.quantize.apply import quantize_weights

    model = ir.load(block_onnx("ref_k1"))  # not fused: no moec.GroupedExperts, so no routed experts
    with pytest.raises(MoecError, match="--quantize-scope experts names no weight"):
        quantize_weights(model, make_spec("nvfp4"), whole_blocks=True)
    assert not _fp4_initializers(model)


def test_must_not_fire_outside_the_experts_scope(demo_onnx, nvfp4_sm120):
    """Attention, the shared expert, the dense MLPs, the router: none FP4 in the default scope."""
    model = ir.load(nvfp4_sm120)
    float_weights = [n for n, v in model.graph.initializers.items()
                     if ("self_attn" in n or "shared_expert" in n or "router" in n) and v.dtype == ir.DataType.FLOAT]
    assert float_weights and not [n for n in _fp4_initializers(model) if ".experts." not in n]


@pytest.mark.parametrize("target,message", [
    ("trt-rtx:sm89", "NVFP4 needs FP4 tensor cores"),
    ("trt:sm90", "NVFP4 needs FP4 tensor cores"),
    ("ort", "no DequantizeLinear for FLOAT4E2M1"),
])
def test_refused_by_name_before_any_output(demo_onnx, tmp_path, capsys, target, message):
    out = tmp_path / "q" / "model.onnx"
    code, _, err = run_cli(["optimize", demo_onnx, "-o", out, "--target", target, "--quantize", "nvfp4"], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert f"target {target}: --quantize nvfp4" in err
    assert not out.exists() and not out.parent.exists()


def test_a_built_nvfp4_graph_is_refused_for_sm89_before_building(nvfp4_sm120, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from moec.compiler.build import BuildConfig, build_engine

    with pytest.raises(MoecError, match="has NVFP4 weights .* sm89 has no FP4 tensor cores"):
        build_engine(nvfp4_sm120, tmp_path / "engine", BuildConfig(archs=("sm89",), progress=False))
    assert not (tmp_path / "engine").exists()


@pytest.mark.trt
def test_sm120_engine_builds_from_the_quantized_demo(demo_ckpt, nvfp4_sm120, tmp_path):
    """A real TensorRT-RTX 1.7 engine for sm120, built on the CPU, beside the fp16 one of the same
    demo. The demo's weights are small beside the engine's kernels, so the sizes are close
    (measured: nvfp4 21.5 MB from the fp32 export, fp16 19.6 MB); the assertion message says both."""
    pytest.importorskip("tensorrt_rtx")
    from moec.compiler.build import BuildConfig, build_engine
    from moec.compiler.export import ExportConfig, export_onnx

    result = build_engine(nvfp4_sm120, tmp_path / "nvfp4", BuildConfig(archs=("sm120",), progress=False))
    manifest = json.loads((tmp_path / "nvfp4" / "manifest.json").read_text())
    assert manifest["quantization"]["format"] == "nvfp4" and manifest["quantization"]["group_size"] == 16
    nvfp4 = result.engines["sm120"].stat().st_size
    export_onnx(demo_ckpt, tmp_path / "fp16_export" / "model.onnx", ExportConfig(dtype="fp16"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize_onnx(tmp_path / "fp16_export" / "model.onnx", tmp_path / "fp16" / "model.onnx",
                      OptimizeConfig(target="trt-rtx:sm120"))
    fp16 = build_engine(tmp_path / "fp16" / "model.onnx", tmp_path / "fp16" / "engine",
                        BuildConfig(archs=("sm120",), progress=False)).engines["sm120"].stat().st_size
    assert 0 < nvfp4 < 1.5 * fp16, f"sm120 engine: nvfp4 {nvfp4} bytes vs fp16 {fp16} bytes ({nvfp4 / fp16:.2f}x)"
    print(f"sm120 engine: nvfp4 {nvfp4} bytes vs fp16 {fp16} bytes ({nvfp4 / fp16:.2f}x)")


def test_compile_refuses_to_verify_nvfp4_on_onnx_runtime_before_exporting(tmp_path, capsys):
    code, _, err = run_cli(["compile", "-o", tmp_path / "out", "--target", "trt-rtx:sm120", "--quantize", "nvfp4"],
                           capsys)
    assert code == 2 and "cannot run FLOAT4E2M1 weights; add --no-verify" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target,allowed", [("trt-rtx:sm120", True), ("trt-rtx:sm121", True), ("trt:sm100", True),
                                            ("trt:sm110", True), ("trt:sm90", False), ("trt-rtx:sm86", False),
                                            ("ort", False)])
def test_which_targets_take_nvfp4(target, allowed):
    from moec.compiler.quantize_stage import check_quantize_request
    from moec.passes.targets import parse_target

    config = OptimizeConfig(target=target, quantize="nvfp4")
    if allowed:
        assert check_quantize_request(config, parse_target(target)).format == "nvfp4"
    else:
        with pytest.raises(MoecError, match=f"target {target}: --quantize nvfp4: "):
            check_quantize_request(config, parse_target(target))


def test_fp16_weight_gets_its_block_scales_cast_to_fp16():
    """An fp16 graph: DequantizeLinear(E4M3, fp32 global) -> Cast(fp16) -> DequantizeLinear(E2M1)
    -> MatMul, so the weight reaches the MatMul in the graph's dtype; the numbers are the
    quantizer's to fp16 rounding."""
    from moec.passes.quantize.apply import quantize_weights

    K, N = 48, 8
    w = _weights(5, (K, N), 2.0).astype(np.float16)
    x = ir.Value(name="x", shape=ir.Shape(["B", K]), type=ir.TensorType(ir.DataType.FLOAT16))
    wv = ir.Value(name="model.layers.0.self_attn.q_proj.weight", shape=ir.Shape([K, N]),
                  type=ir.TensorType(ir.DataType.FLOAT16), const_value=ir.tensor(w))
    mm = ir.Node("", "MatMul", [x, wv])
    mm.outputs[0].name, mm.outputs[0].dtype = "y", ir.DataType.FLOAT16
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[wv], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    assert quantize_weights(model, make_spec("nvfp4", scope="all"), whole_blocks=True) == 1
    assert model.opset_imports[""] == 23 and model.ir_version == 11
    dq = mm.inputs[1].producer()
    cast = dq.inputs[1].producer()
    assert dq.op_type == "DequantizeLinear" and mm.inputs[1].dtype == ir.DataType.FLOAT16
    assert cast.op_type == "Cast" and cast.attributes["to"].value == ir.DataType.FLOAT16
    scale_dq = cast.inputs[0].producer()
    assert scale_dq.op_type == "DequantizeLinear" and scale_dq.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN
    bs, gs = scale_dq.inputs
    q = _decode_e2m1(dq.inputs[0].const_value.tobytes(), (K, N))
    scale = (_decode_e4m3(bs.const_value.tobytes(), (K // 16, N)) * np.float32(gs.const_value.numpy())).astype(np.float16)
    graph_w = (q.astype(np.float16) * np.repeat(scale, 16, axis=0)).astype(np.float32)
    ref = dequantize(NVFP4.quantize(w.astype(np.float32), 0, 16, True))
    np.testing.assert_allclose(graph_w, ref, rtol=2.0**-10, atol=1e-7)
