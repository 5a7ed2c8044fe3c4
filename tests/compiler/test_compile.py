"""The main job, `moec compile`: every stage on the demo checkpoint, and failures leave nothing."""

from __future__ import annotations

import importlib.util
import json

import pytest

from moec_cli import run_cli
from moec.compiler.compile import CompileConfig, compile_checkpoint
from moec.common.errors import MoecError


def test_compile_demo_to_sm89_engine(tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["compile", "-o", str(out), "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["checkpoint", "export", "optimize", "verify", "verify vision", "build"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    # The demo has 2 MoE layers: both fused, none left unfused.
    assert stages["optimize"]["fused_ops"].startswith("2 gating + 2 experts / 2 MoE layers")
    manifest = json.loads((out / "engine" / "manifest.json").read_text())
    assert manifest["archs"] == ["sm89"] and manifest["trt"]["flavour"] == "tensorrt-rtx"
    assert (out / "engine" / manifest["engines"][0]["file"]).stat().st_size > 0
    # The demo is multimodal: its vision engine is built beside the text engine.
    assert (out / "engine" / manifest["vision"]["engines"][0]["file"]).stat().st_size > 0
    verify = json.loads((out / "verify_report.json").read_text())
    assert verify["passed"] and all(verify["greedy_match"])
    assert json.loads((out / "compile_report.json").read_text())["passed"]
    # Nothing temporary is left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_verify_keeps_previous_output_and_leaves_no_partial(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # An earlier compile's output (moec's marker naming the command): replaceable.
    (out / ".moec-output.json").write_text('{"written_by": "moec", "command": "compile"}')
    (out / "compile_report.json").write_text("{}")
    (out / "previous.txt").write_text("an earlier good compile")
    # atol = rtol = 0: any rounding difference between ORT and torch fails the verify stage.
    with pytest.raises(MoecError, match="verify") as exc:
        compile_checkpoint(None, out, CompileConfig(target="ort", atol=0.0, rtol=0.0, progress=False))
    # The discarded folder's report is gone, so the message carries the worst comparisons itself.
    assert "worst: logits at" in str(exc.value) or "worst: present_" in str(exc.value)
    assert "verify_report.json" not in str(exc.value)
    stages = [(s.stage, s.status) for s in exc.value.report.stages]
    assert stages[-1] == ("verify", "FAILED") and ("build", "skipped") not in stages
    assert sorted(p.name for p in out.iterdir()) == [".moec-output.json", "compile_report.json", "previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_is_not_a_compile_output_is_refused_before_work(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    # -o equal to the checkpoint would replace it with the compile output.
    code, _, err = run_cli(["compile", str(ckpt), "-o", str(ckpt)], capsys)
    assert code == 2 and "holds the input" in err
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json"]
    # A folder of the user's that is not an earlier compile output.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    code, _, err = run_cli(["compile", "-o", str(notes)], capsys)
    assert code == 2 and "choose a new or empty folder" in err
    assert sorted(p.name for p in notes.iterdir()) == ["mine.txt"]
    # A file.
    f = tmp_path / "file.txt"
    f.write_text("keep")
    code, _, err = run_cli(["compile", "-o", str(f)], capsys)
    assert code == 2 and f.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file.txt", "notes"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "trt-rtx"], "needs an arch"),
        (["--target", "cuda:sm90"], "unknown target"),
        (["NOT_A_DIR"], "does not exist; give a Hugging Face checkpoint folder"),
        # Refused before the checkpoint is exported, not by the build at the end.
        (["--target", "trt-rtx:sm90"], "TensorRT-RTX cannot target sm90"),
        (["--target", "trt:sm42"], "unknown arch sm42"),
        (["--target", "trt-rtx:sm89", "--moe-lowering", "function"], "MoE lowering 'function' cannot run there"),
        (["--target", "ort", "--moe-lowering", "fast"], "'fast' is not one of"),
        # Full TensorRT's lowerings are offered only where it is installed (tests/compiler/test_cli_conventions.py).
        *([(["--target", "trt-rtx:sm89", "--moe-lowering", "trt-plugin"], "'trt-plugin' is not one of")]
          if importlib.util.find_spec("tensorrt") is None else []),
        (["--target", "trt-rtx:sm80,sm80"], "arch sm80 is listed twice"),
        (["--target", "trt-rtx:a100,sm80"], "arch sm80 is listed twice (a100 and sm80)"),
        (["--target", "trt-rtx:sm80", "--target", "ort"], "one compile builds one kind of target"),
        (["--target", "trt-rtx:h100"], "TensorRT-RTX cannot target sm90"),
    ],
)
def test_bad_input_is_one_line_error_and_no_output(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a if a != "NOT_A_DIR" else str(tmp_path / "missing") for a in argv]
    code, _, err = run_cli(["compile", *argv, "-o", str(out)], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists() and "stage" not in err  # no stage ran


def test_missing_tensorrt_flavour_is_refused_before_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    with pytest.raises(MoecError, match=r"tensorrt, which is not installed; install it \(pip install 'moec\[tensorrt\]'\)"):
        compile_checkpoint(None, tmp_path / "out", CompileConfig(target="trt:sm90", progress=False))
    assert not list(tmp_path.iterdir())


def test_bf16_without_a_gpu_provider_verifies_the_fp32_twin(tmp_path, monkeypatch):
    """ONNX Runtime's CPU provider cannot run the bf16 graph: verify checks the same pipeline in
    fp32 instead of skipping, says so, and leaves no twin behind; the bf16 graph is the output."""
    import onnx
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    out = tmp_path / "out"
    report = compile_checkpoint(None, out, CompileConfig(target="ort", precision="bf16", progress=False))
    verify = {s.stage: s for s in report.stages}["verify"]
    assert verify.status == "ok" and "its fp32 twin (same export and passes) was verified" in verify.detail
    assert "torch fp32" in verify.detail
    vision = {s.stage: s for s in report.stages}["verify vision"]
    assert vision.status == "ok" and vision.detail.startswith("the bf16 vision graph has no ONNX Runtime CPU kernels")
    assert "image prompt not run" in vision.detail
    assert report.passed and not (out / "verify-fp32").exists()
    graph = onnx.load(str(out / "onnx" / "model.opt.onnx"), load_external_data=False)
    assert onnx.TensorProto.BFLOAT16 in {t.data_type for t in graph.graph.initializer}


def test_errors_name_final_paths_not_the_temporary_folder(tmp_path, monkeypatch):
    import moec.compiler.compile as compile_mod

    def failing(state):
        raise MoecError(f"{state.work / 'onnx' / 'model.onnx'}: something is wrong with it")

    monkeypatch.setattr(compile_mod, "STAGES", [("checkpoint", compile_mod.stage_checkpoint), ("export", failing)])
    out = tmp_path / "out"
    with pytest.raises(MoecError) as exc:
        compile_checkpoint(None, out, CompileConfig(target="ort", progress=False))
    assert f"{out / 'onnx' / 'model.onnx'}: something is wrong" in str(exc.value)
    assert ".tmp" not in str(exc.value) and ".tmp" not in exc.value.report.stages[-1].detail


def test_summary_fits_80_columns_in_a_pipe(tmp_path, capsys, monkeypatch):
    import moec.compiler.compile as compile_mod
    from moec.compiler.compile import CompileReport, StageRecord

    stages = [
        StageRecord("checkpoint", 0.01, "ok", "demo llama4-tiny (seed 0)", artifact_bytes=1_234_567),
        StageRecord("export", 3.2, "ok", "fp32, 512 positions", artifact_bytes=2_345_678),
        StageRecord("optimize", 2.5, "ok", "lowering hybrid x2; " + "a long warning about something " * 4,
                    fused_ops="2 gating + 2 experts / 2 MoE layers", artifact_bytes=2_345_000),
        StageRecord("verify", 8.1, "ok", "model.opt.onnx in ORT vs torch fp32, atol 0.0001 rtol 0.001; greedy 8/8 steps equal",
                    max_error="2.41e-06 (logits, prefill)"),
        StageRecord("build", 20.0, "ok", "tensorrt-rtx 1.7.1.116, sm89", artifact_bytes=20_000_000),
    ]
    report = CompileReport(out_dir=tmp_path / "out", target="trt-rtx:sm89", stages=stages,
                           artifacts={"engine": str(tmp_path / "out" / "engine")})
    monkeypatch.setattr(compile_mod, "compile_checkpoint", lambda *a, on_stage=None, **k: report)
    monkeypatch.delenv("COLUMNS", raising=False)
    code, stdout, _ = run_cli(["compile", "-o", str(tmp_path / "out")], capsys)
    assert code == 0
    lines = stdout.splitlines()
    assert max(map(len, lines)) <= 80, "\n".join(l for l in lines if len(l) > 80)
    # Every value is readable whole: short cells on one line, details as text a reader can follow.
    for cell in ("2 gating + 2 experts / 2 MoE layers", "2.41e-06 (logits, prefill)", "19.1 MiB", "20.0 s"):
        assert any(cell in l for l in lines), cell
    flat = " ".join(" ".join(lines).split())
    for s in stages:
        assert " ".join(s.detail.split()) in flat, s.detail
