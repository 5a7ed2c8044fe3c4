"""`moec verify CKPT --onnx GRAPH.onnx`: any moec graph of the checkpoint (the export, a fused and
lowered one, a quantized one) against torch, each within its own dtype's tolerance."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler.verify import VerifyConfig
from moec.compiler.verify_graph import verify_onnx
from moec_cli import run_cli

FAST = dict(decode_steps=2, batch=1)


def copy_graph(src, dest_dir):
    dest_dir.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        shutil.copy(f, dest_dir / f.name)
    return dest_dir / src.name


def edit_sidecar(graph, **changes):
    side = contract.sidecar_path(graph)
    meta = json.loads(side.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            meta[key].update(value)
        else:
            meta[key] = value
    side.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def fused_int8(demo_onnx, tmp_path_factory):
    """The export fused and lowered for ONNX Runtime with int8 experts (com.microsoft.QMoE)."""
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    out = tmp_path_factory.mktemp("int8") / "model.opt.onnx"
    report = optimize_onnx(demo_onnx, out, OptimizeConfig(target="ort", quantize="int8", require_fusion=True))
    assert report.fused_experts > 0
    return out


def test_the_export_and_its_cli(demo_ckpt, demo_onnx, capsys, monkeypatch):
    from moec.common import progress

    steps = []
    monkeypatch.setattr(progress, "step", steps.append)
    code, out, err = run_cli(["verify", demo_ckpt, "--onnx", demo_onnx, "--decode-steps", 2, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["dtype"] == "fp32" and report["atol"] == 1e-4
    assert steps[:3] == ["prefill", "decode step 1 of 2", "decode step 2 of 2"]  # what a terminal is shown


def test_a_quantized_fused_graph_passes_against_dequantized_torch(demo_ckpt, fused_int8, monkeypatch):
    import moec.compiler.verify_graph as vg

    report = verify_onnx(demo_ckpt, fused_int8, VerifyConfig(dtype="fp32", **FAST))
    assert report.passed, [(r.step, r.output, r.max_abs) for r in report.failures]
    # Must-not-pass: the same graph against torch's own (unquantized) weights is out of fp32's tolerance,
    # so the pass above is the dequantized reference at work, not a tolerance wide enough for int8.
    monkeypatch.setattr(vg, "quantization_spec", lambda meta, path=None: None)
    assert not verify_onnx(demo_ckpt, fused_int8, VerifyConfig(dtype="fp32", **FAST)).passed


def test_a_wrong_weight_fails(demo_ckpt, demo_onnx, tmp_path, capsys):
    graph = copy_graph(demo_onnx, tmp_path / "g")
    model = onnx.load(str(graph))
    init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
    values = onnx.numpy_helper.to_array(init).copy()
    values *= 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    onnx.save(model, str(graph))
    code, out, _ = run_cli(["verify", demo_ckpt, "--onnx", graph, "--decode-steps", 1], capsys)
    assert code == 1 and "FAILED" in out


@pytest.mark.parametrize("quantization,message", [
    ({"method": "gptq"}, "is quantized with --quantize-method gptq, calibrated on the export"),
    ({"method": "rtn", "activations": "fp8 e4m3 static per-tensor"}, "activations fp8 e4m3 static per-tensor"),
    ({"format": "nvfp4", "group_size": 16}, "is quantized with nvfp4, which ONNX Runtime cannot run"),
])
def test_a_calibrated_quantization_is_refused(demo_ckpt, fused_int8, tmp_path, capsys, quantization, message):
    graph = copy_graph(fused_int8, tmp_path / "calibrated")
    edit_sidecar(graph, quantization=quantization)
    code, _, err = run_cli(["verify", demo_ckpt, "--onnx", graph], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_refusals_are_one_line(demo_ckpt, demo_onnx, tmp_path, capsys, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    bf16 = copy_graph(demo_onnx, tmp_path / "bf16")
    edit_sidecar(bf16, precision="bf16")
    other = copy_graph(demo_onnx, tmp_path / "other")
    edit_sidecar(other, model_config={"rms_norm_eps": 0.5})
    trt_only = copy_graph(demo_onnx, tmp_path / "trt")
    edit_sidecar(trt_only, moe_lowering="trt-native")
    cases = [
        (other, [], "was not made from"),
        (trt_only, [], "runs only inside TensorRT"),
        (bf16, [], "computes in bf16, which ONNX Runtime's CPU provider has no kernels for"),
        (demo_onnx, ["--dtype", "fp16"], "computes in fp32; --dtype fp16 does not apply"),
        (tmp_path / "missing.onnx", [], "does not exist"),
    ]
    for graph, extra, message in cases:
        code, _, err = run_cli(["verify", demo_ckpt, "--onnx", graph, *extra], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (graph, err)
    with pytest.raises(MoecError, match="was not made from"):
        verify_onnx(demo_ckpt, other)
