"""A pre-quantized (fbgemm_fp8) checkpoint stays FP8 from the export to the engine: the export
writes its FP8 values and scales as DequantizeLinear (no float copy), optimize keeps them (with or
without --quantize fp8), and ONNX Runtime gives the same numbers as the dequantized export; it does
not fire for --fp8-weights dequantize or a bf16 checkpoint; an arch without FP8 is named."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from safetensors.torch import load_file

from moec.common.errors import MoecError
from moec.compiler.export import ExportConfig, export_onnx
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).parents[1]))
from moec_cli import run_cli  # noqa: E402
from test_fp8_checkpoint import _write_fp8  # noqa: E402


def _passes_helpers():
    # tests/passes/conftest.py's graph helpers, under a name that is not "conftest" (tests/ has its own).
    import importlib.util

    spec = importlib.util.spec_from_file_location("moec_passes_helpers", Path(__file__).parents[1] / "passes" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_feeds, ort_run, rel_err = (getattr(_passes_helpers(), n) for n in ("demo_feeds", "ort_run", "rel_err"))

EXPERTS = [f"model.layers.{i}.feed_forward.experts.{p}_proj" for i in (1, 3) for p in ("gate_up", "down")]


@pytest.fixture(scope="module")
def fp8(demo_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_export")
    _write_fp8(demo_ckpt, root / "ckpt", "stacked")
    for mode in ("keep", "dequantize"):
        export_onnx(root / "ckpt", root / mode / "model.onnx", ExportConfig(dtype="fp32", fp8_weights=mode))
    return root


def _fp8_weights(path: Path) -> dict[str, np.ndarray]:
    """{weight name: its FP8 q as float32} for every DequantizeLinear of float8 in the graph."""
    model = ir.load(path)
    return {n.outputs[0].name: n.inputs[0].const_value.numpy().astype(np.float32) for n in model.graph
            if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN}


def test_export_keeps_the_checkpoints_fp8_bytes(fp8):
    stored = load_file(str(fp8 / "ckpt" / "model.safetensors"))
    model = ir.load(fp8 / "keep" / "model.onnx")
    kept = _fp8_weights(fp8 / "keep" / "model.onnx")
    assert sorted(kept) == sorted(EXPERTS)
    for name in EXPERTS:
        assert np.array_equal(kept[name], stored[name].float().numpy()), name
        assert name not in model.graph.initializers  # no float copy beside it
    sidecar = json.loads((fp8 / "keep" / "model.moec.json").read_text())["quantization"]
    assert (sidecar["format"], sidecar["source"], sidecar["quant_method"], sidecar["weights"]) == \
        ("fp8", "checkpoint", "fbgemm_fp8", 4)


def test_does_not_fire_when_dequantized_or_not_fp8(fp8, demo_onnx):
    assert _fp8_weights(fp8 / "dequantize" / "model.onnx") == {}
    assert _fp8_weights(demo_onnx) == {}
    assert "quantization" not in json.loads((fp8 / "dequantize" / "model.moec.json").read_text())


@pytest.mark.parametrize("target,quantize", [("ort", None), ("trt-rtx:sm89", None), ("trt-rtx:sm89", "fp8")])
def test_optimize_keeps_them_and_the_numbers(fp8, tmp_path, target, quantize):
    out = tmp_path / "opt" / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = optimize_onnx(fp8 / "keep" / "model.onnx", out, OptimizeConfig(target=target, quantize=quantize))
    assert report.fused_experts == 2
    kept = _fp8_weights(out)
    stored = load_file(str(fp8 / "ckpt" / "model.safetensors"))
    assert all(np.array_equal(kept[n], stored[n].float().numpy()) for n in EXPERTS), sorted(kept)
    names = {n.name for n in ir.load(out).graph}
    assert sum(name.endswith("/checkpoint_fp8") for name in names) == 4  # taken as they came, not requantized
    assert json.loads(out.with_name("model.moec.json").read_text())["quantization"]["checkpoint_fp8_weights"] == 4
    for past, new in [(0, 6), (5, 1)]:
        feeds = demo_feeds(fp8 / "dequantize" / "model.onnx", past, new)
        want = ort_run(fp8 / "dequantize" / "model.onnx", feeds)
        for g, w in zip(ort_run(out, feeds), want):
            assert rel_err(g, w) < 1e-5, rel_err(g, w)
        assert rel_err(ort_run(fp8 / "keep" / "model.onnx", feeds)[0], want[0]) < 1e-6


def test_export_cli_fp8_weights_option(fp8, tmp_path, capsys):
    code, _, err = run_cli(["export", fp8 / "ckpt", "-o", tmp_path / "d" / "model.onnx", "--dtype", "fp32",
                            "--fp8-weights", "dequantize"], capsys)
    assert code == 0, err
    assert _fp8_weights(tmp_path / "d" / "model.onnx") == {}
    code, _, err = run_cli(["export", fp8 / "ckpt", "-o", tmp_path / "x" / "model.onnx", "--fp8-weights", "drop"], capsys)
    assert code == 2 and "Invalid value for '--fp8-weights'" in err and not (tmp_path / "x").exists()


def test_an_arch_without_fp8_is_named_before_work(fp8, tmp_path):
    with pytest.raises(MoecError, match=r"holds its checkpoint's FP8 weights .* trt-rtx:sm86 has no FP8 tensor cores"):
        optimize_onnx(fp8 / "keep" / "model.onnx", tmp_path / "o" / "model.onnx", OptimizeConfig(target="trt-rtx:sm86"))
    assert not (tmp_path / "o").exists()


@pytest.mark.trt
def test_sm89_engine_from_the_kept_fp8_weights(fp8, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from moec.compiler.build import BuildConfig, build_engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize_onnx(fp8 / "keep" / "model.onnx", tmp_path / "model.onnx", OptimizeConfig(target="trt-rtx:sm89"))
    result = build_engine(tmp_path / "model.onnx", tmp_path / "engine", BuildConfig(archs=("sm89",), progress=False))
    assert result.engines["sm89"].stat().st_size > 0
    quant = result.manifest["quantization"]
    assert (quant["format"], quant["source"], quant["checkpoint_fp8_weights"]) == ("fp8", "checkpoint", 4)
    # The engine size says nothing here: the demo's experts are 64 KiB of the engine's 20 MB of kernels
    # (tests/compiler/test_quantized_engines.py measures FP8 engine sizes on a MoE-heavy config).
