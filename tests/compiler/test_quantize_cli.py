"""`moec optimize` / `moec compile` quantization options: a thin layer that fills the stage
dataclasses, and bad requests as one `error:` line (exit 2) before any output is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))
from moec_cli import run_cli  # noqa: E402


def test_optimize_quantize_int4_writes_matmulnbits_and_records_it(demo_onnx, tmp_path, capsys):
    import onnx_ir as ir

    out = tmp_path / "q" / "model.onnx"
    code, stdout, err = run_cli(["optimize", demo_onnx, "-o", out, "--quantize", "int4", "--quantize-group", "32",
                                 "--quantize-asymmetric"], capsys)
    assert code == 0, err
    assert "quantize_int4-g32-asym" in stdout
    # int4 experts on ort: a MatMulNBits pair per expert (split), 2 MoE layers x 4 experts.
    assert sum(n.op_type == "MatMulNBits" for n in ir.load(out).graph) == 16
    q = json.loads(out.with_name("model.moec.json").read_text())["quantization"]
    assert (q["format"], q["group_size"], q["symmetric"], q["scope"]) == ("int4", 32, False, "experts")


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int4"], "--quantize-group 128 is longer than"),
    (["--quantize", "int8", "--quantize-group", "64"], "--quantize-group applies to int4"),
    (["--quantize-scope", "all"], "need --quantize"),
    (["--quantize", "fp8", "--target", "trt-rtx:sm86"], "FP8 needs FP8 tensor cores"),
    (["--quantize", "fp8", "--quantize-asymmetric"], "fp8 is symmetric only"),
    (["--quantize", "int8", "--quantize-method", "awq"], "--quantize-method awq: applies to int4"),
    (["--quantize", "int4", "--quantize-activations", "static"], "FP8 activations go with --quantize fp8"),
    (["--quantize", "fp8", "--quantize-activations", "dynamic"], "dynamic: int8 activations at run time go with --quantize int4"),
    (["--quantize", "int8", "--quantize-method", "gptq"], "--quantize-method gptq: applies to int4"),
    (["--quantize", "int4", "--quantize-activations", "static-no-down"], "FP8 activations go with --quantize fp8"),
    (["--quantize", "int4", "--quantize-method", "awq-gptq", "--quantize-activations", "static-no-down"],
     "--quantize-activations static-no-down: FP8 activations go with --quantize fp8, not int4"),
    (["--quantize", "fp8", "--quantize-activations", "static", "--quantize-calibration", "/nonexistent/p.txt"],
     "--quantize-calibration /nonexistent/p.txt: no such file"),
    (["--quantize", "int4", "--quantize-group", "32", "--quantize-method", "clip", "--quantize-calibration",
      __file__], "nothing calibrates"),
])
def test_optimize_bad_quantize_requests(demo_onnx, tmp_path, capsys, args, message):
    out = tmp_path / "q" / "model.onnx"
    code, _, err = run_cli(["optimize", demo_onnx, "-o", out, *args], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("method", ["awq", "gptq", "awq-gptq"])
def test_compile_refuses_a_calibrated_quantization_it_cannot_verify(tmp_path, capsys, method):
    code, _, err = run_cli(["compile", "-o", tmp_path / "out", "--quantize", "int4", "--quantize-group", "32",
                            "--quantize-method", method], capsys)
    assert code == 2 and "compile cannot verify it against torch" in err and not (tmp_path / "out").exists()


def test_compile_refuses_a_group_that_does_not_fit_the_demo_before_exporting(tmp_path, capsys):
    code, _, err = run_cli(["compile", "-o", tmp_path / "out", "--quantize", "int4", "--quantize-scope", "mlp"], capsys)
    assert code == 2 and "--quantize-group 128 is longer than experts.down_proj's reduction dimension 32" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,record", [
    (["--quantize", "int4", "--quantize-group", "32", "--quantize-method", "awq-gptq"], ("method", "awq-gptq")),
    (["--quantize", "fp8", "--quantize-activations", "static-no-down"],
     ("activations", "fp8 e4m3 static per-tensor, down_proj inputs in float (weight-only)")),
])
def test_optimize_calibrated_options_reach_the_sidecar(demo_onnx, tmp_path, capsys, args, record):
    out = tmp_path / "q" / "model.onnx"
    code, _, err = run_cli(["optimize", demo_onnx, "-o", out, "--quantize-scope", "mlp", *args], capsys)
    assert code == 0, err
    q = json.loads(out.with_name("model.moec.json").read_text())["quantization"]
    assert q[record[0]] == record[1] and q["calibration"].startswith("calibration.txt (")
