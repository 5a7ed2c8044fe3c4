"""Real TensorRT-RTX engines from quantized graphs, built on the CPU: int4 / int8 / fp8 for sm89 and
sm120, the engine size on a MoE-heavy config, the arch checks, and the NVFP4 form moec emits."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from moec.common.errors import MoecError

trt = pytest.importorskip("tensorrt_rtx")
pytestmark = pytest.mark.trt


def _optimize_and_build(export: Path, out: Path, arch: str, precision: str | None = None, **quantize) -> int:
    from moec.compiler.build import BuildConfig, build_engine
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize_onnx(export, out / "model.onnx", OptimizeConfig(target=f"trt-rtx:{arch}", precision=precision,
                                                                 **quantize))
    result = build_engine(out / "model.onnx", out / "engine", BuildConfig(archs=(arch,), progress=False))
    assert (result.manifest["quantization"] is not None) == bool(quantize)
    return result.engines[arch].stat().st_size


@pytest.mark.parametrize("arch,quantize", [("sm89", dict(quantize="int4", quantize_group=32)),
                                           ("sm89", dict(quantize="fp8")), ("sm120", dict(quantize="fp8")),
                                           ("sm80", dict(quantize="int8")),
                                           ("sm89", dict(quantize="int4", quantize_group=32, quantize_method="awq")),
                                           ("sm89", dict(quantize="fp8", quantize_activations="static")),
                                           ("sm120", dict(quantize="fp8", quantize_activations="static")),
                                           ("sm89", dict(quantize="int4", quantize_group=32, quantize_method="gptq")),
                                           ("sm89", dict(quantize="int4", quantize_group=32,
                                                         quantize_method="awq-gptq")),
                                           ("sm89", dict(quantize="fp8", quantize_activations="static-no-down"))])
def test_quantized_demo_engines_build(demo_onnx, tmp_path, arch, quantize):
    import json

    size = _optimize_and_build(demo_onnx, tmp_path, arch, quantize_scope="all", **quantize)
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert size > 0 and manifest["quantization"]["format"] == quantize["quantize"]
    assert manifest["quantization"]["method"] == quantize.get("quantize_method", "rtn")
    if quantize.get("quantize_activations") == "static":  # W8A8: the activation scheme and its calibration
        assert manifest["quantization"]["activations"] == "fp8 e4m3 static per-tensor"
    if quantize.get("quantize_activations", "none") != "none" or quantize.get("quantize_method", "rtn") != "rtn":
        assert manifest["quantization"]["calibration"].startswith("calibration.txt (")


def test_asymmetric_int4_is_refused_for_tensorrt_before_any_work(demo_onnx, tmp_path):
    """TensorRT has no UINT4 and takes zero points of 0 only (quantize_stage.py has the parser's
    words), so --quantize-asymmetric on a trt / trt-rtx target is named before the passes run."""
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    for target in ("trt-rtx:sm89", "trt:sm90"):
        with pytest.raises(MoecError, match=f"target {target}: --quantize int4-g32-asym-awq-gptq: TensorRT has no "
                                            "UINT4 weights .* drop --quantize-asymmetric"):
            optimize_onnx(demo_onnx, tmp_path / "model.onnx", OptimizeConfig(
                target=target, quantize="int4", quantize_group=32, quantize_symmetric=False,
                quantize_method="awq-gptq"))
        assert not (tmp_path / "model.onnx").exists()


def test_fp8_engine_for_an_arch_without_fp8_is_refused_before_building(demo_onnx, tmp_path):
    from moec.compiler.build import BuildConfig, build_engine
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize_onnx(demo_onnx, tmp_path / "model.onnx", OptimizeConfig(target="trt-rtx:sm89", quantize="fp8"))
    with pytest.raises(MoecError, match="has FP8 weights .* sm80 has no FP8 tensor cores"):
        build_engine(tmp_path / "model.onnx", tmp_path / "engine", BuildConfig(archs=("sm80",), progress=False))
    assert not (tmp_path / "engine").exists()


def _moe_heavy_export(tmp_path: Path, dtype: str = "fp16") -> Path:
    """E=64 experts of 512 x 512 in both layers, exported in fp16 (fp32 for calibration)."""
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.models import Llama4Config
    from moec.models.demo import write_demo_checkpoint

    config = Llama4Config.preset("llama4-tiny").replace(
        hidden_size=512, intermediate_size=512, intermediate_size_mlp=512, num_local_experts=64,
        num_attention_heads=8, head_dim=64, num_hidden_layers=2, moe_layers=[0, 1], max_position_embeddings=64)
    ckpt = write_demo_checkpoint(tmp_path / "ckpt", preset=config)
    export = tmp_path / "onnx" / "model.onnx"
    export_onnx(ckpt, export, ExportConfig(dtype=dtype, max_batch=2))
    return export


@pytest.fixture(scope="module")
def moe_heavy_fp32(tmp_path_factory):
    """The MoE-heavy config exported in fp32 (calibration runs the export on ONNX Runtime, which
    needs fp32: calibrate.py) and its fp16 sm89 engine's size (optimize --precision fp16)."""
    tmp = tmp_path_factory.mktemp("moe_heavy_fp32")
    export = _moe_heavy_export(tmp, dtype="fp32")
    return export, _optimize_and_build(export, tmp / "fp16", "sm89", precision="fp16")


@pytest.mark.slow
@pytest.mark.parametrize("quantize,bound", [(dict(quantize="int4", quantize_method="gptq"), 0.35),
                                            (dict(quantize="int4", quantize_method="awq-gptq"), 0.35),
                                            (dict(quantize="fp8", quantize_activations="static-no-down"), 0.6)])
def test_calibrated_engines_are_a_fraction_of_fp16_on_a_moe_heavy_config(moe_heavy_fp32, tmp_path, quantize, bound):
    """The calibrated methods (gptq, awq-gptq, FP8 activations) calibrate on the fp32 export and
    quantize the fp16 graph (--precision fp16); their engines keep the experts in int4 / FP8.
    Measured (sm89): fp16 222.95 MB, int4-g128-gptq 74.10 MB (0.332x), int4-g128-awq-gptq
    74.13 MB (0.332x), fp8-w8a8-no-down 123.29 MB (0.553x)."""
    export, fp16 = moe_heavy_fp32
    size = _optimize_and_build(export, tmp_path, "sm89", precision="fp16", **quantize)
    assert size <= bound * fp16, f"sm89 engine: {quantize} {size} bytes vs fp16 {fp16} bytes ({size / fp16:.3f}x)"


@pytest.mark.slow
def test_nvfp4_engine_is_a_fraction_of_fp16_on_a_moe_heavy_config(tmp_path):
    """The same config for sm120 (NVFP4 needs it): 4 bits a weight plus an E4M3 scale per 16, 4.5
    bits, so a little over int4-g128's 4.125. Measured: fp16 222.7 MB, nvfp4 79.1 MB (0.36x)."""
    export = _moe_heavy_export(tmp_path)
    fp16 = _optimize_and_build(export, tmp_path / "fp16", "sm120")
    nvfp4 = _optimize_and_build(export, tmp_path / "nvfp4", "sm120", quantize="nvfp4")
    assert nvfp4 <= 0.4 * fp16, f"sm120 engine: nvfp4 {nvfp4} bytes vs fp16 {fp16} bytes ({nvfp4 / fp16:.3f}x)"


@pytest.mark.slow
def test_int4_and_fp8_engines_are_a_fraction_of_fp16_on_a_moe_heavy_config(tmp_path):
    """E=64 experts of 512 x 512 in both layers: 201 MB of the fp16 engine's weights are experts
    (like Scout, where a layer's experts are 4.5 GB). Measured: fp16 223 MB, int4-g128 74.5 MB
    (0.33x), fp8 124 MB (0.55x); the remainder is the non-expert weights and about 17 MB of kernels."""
    export = _moe_heavy_export(tmp_path)
    fp16 = _optimize_and_build(export, tmp_path / "fp16", "sm89")
    int4 = _optimize_and_build(export, tmp_path / "int4", "sm89", quantize="int4")
    fp8 = _optimize_and_build(export, tmp_path / "fp8", "sm89", quantize="fp8")
    assert int4 <= 0.35 * fp16, (int4, fp16)
    assert fp8 <= 0.6 * fp16, (fp8, fp16)


def _nvfp4_matmul_model():
    """x @ DequantizeLinear(w FLOAT4E2M1 [K, N], DequantizeLinear(block scales E4M3, global fp32),
    axis 0, block 16): NVFP4's two-level scaling as TensorRT reads it (opset 23)."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    K, N = 256, 128
    nibbles = np.random.default_rng(0).integers(0, 16, K * N).astype(np.uint8)
    w = helper.make_tensor("w", TensorProto.FLOAT4E2M1, [K, N], (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes(), raw=True)
    scales = np.ones((K // 16, N), np.float32).astype(ml_dtypes.float8_e4m3fn).tobytes()
    bs = helper.make_tensor("bs", TensorProto.FLOAT8E4M3FN, [K // 16, N], scales, raw=True)
    gs = numpy_helper.from_array(np.array(0.01, np.float32), "gs")
    nodes = [helper.make_node("DequantizeLinear", ["bs", "gs"], ["s"]),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=16),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "nvfp4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])], initializer=[w, bs, gs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    return model, K


@pytest.mark.parametrize("arch,builds", [("sm120", True), ("sm121", True), ("sm89", False)])
def test_nvfp4_builds_on_the_cpu_for_sm12x_only(arch, builds):
    """NVFP4 (E2M1 weights, E4M3 block scales) on TensorRT-RTX 1.7, in the form `--quantize nvfp4`
    emits (passes/quantize/nvfp4.py, apply.py): it builds for sm120 and sm121 on a CPU; sm89 is refused
    ("HW-specific datatypes: fp4_e2m1"), which is why moec refuses nvfp4 below Blackwell by name
    (compiler/quantize_stage.py). The demo's nvfp4 engine: tests/passes/test_quantize_nvfp4.py."""
    model, K = _nvfp4_matmul_model()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString())
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, arch.upper()), 0)
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, K), (4, K), (16, K))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert (engine is not None) == builds


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_nvfp4_rank_engines_are_a_fraction_of_fp16_with_tp_or_ep(tmp_path, tp, ep):
    """--tp 2 / --ep 2 with --quantize nvfp4 for trt-rtx:sm120: the partition slices the float
    experts first (the partition phase runs before quantize), so each rank quantizes its own slice
    (tp: I / 2 per expert, 256 here, still whole blocks of 16; ep: 32 of the 64 experts) and each
    rank's engine builds and keeps E2M1 weights. The non-expert weights are replicated per rank,
    hence a higher ratio than one engine's 0.36x. Measured per rank: tp 2 fp16 119.66 MB, nvfp4
    48.41 MB (0.405x); ep 2 fp16 121.09 MB, nvfp4 49.85 MB (0.412x)."""
    import json

    import onnx_ir as ir

    from moec.compiler.build import BuildConfig
    from moec.compiler.build.parallel import build_rank_engines
    from moec.compiler.partition import ParallelConfig, optimize_partitioned
    from moec.compiler.pipeline import OptimizeConfig

    export = _moe_heavy_export(tmp_path)
    sizes = {}
    for quantize in (None, "nvfp4"):
        part, eng = tmp_path / f"part_{quantize}", tmp_path / f"eng_{quantize}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimize_partitioned(export, part, OptimizeConfig(target="trt-rtx:sm120", quantize=quantize),
                                 ParallelConfig(tp, ep))
        build_rank_engines(part, eng, BuildConfig(archs=("sm120",), progress=False))
        sizes[quantize] = [(eng / f"rank{r}" / "engine.sm120.plan").stat().st_size for r in range(2)]
        if quantize:
            for r in range(2):
                graph = ir.load(part / f"rank{r}.onnx").graph
                assert sum(v.dtype == ir.DataType.FLOAT4E2M1 for v in graph.initializers.values()) == 4  # 2 layers
                manifest = json.loads((eng / f"rank{r}" / "manifest.json").read_text())
                assert manifest["quantization"]["format"] == "nvfp4" and manifest["parallel"]["rank"] == r
    for r, (fp16, nvfp4) in enumerate(zip(sizes[None], sizes["nvfp4"])):
        assert nvfp4 <= 0.45 * fp16, f"tp {tp} ep {ep} rank {r}: nvfp4 {nvfp4} vs fp16 {fp16} ({nvfp4 / fp16:.3f}x)"
