"""Exit codes keep their meaning (issue 11): 0 ok, 1 a real regression or verify failure, 2 bad
input or environment. `moec verify` exits 1 on a failed comparison (tests/models/test_nonfinite.py);
so does `moec compile` when its verify stage fails, and it leaves nothing behind either way."""

from __future__ import annotations

import pytest

from moec.common.errors import MoecError
from moec_cli import run_cli


def _stages(kind):
    import moec.compiler.compile as compile_mod

    def verify_fails(state):
        rec = compile_mod.StageRecord("verify", 0.0, "FAILED", "logits out of tolerance")
        raise compile_mod._StageFailed(rec, "verify failed: 1 of 1 comparisons out of tolerance")

    def bad_input(state):
        raise MoecError("the checkpoint is damaged")

    return [("verify", verify_fails if kind == "verify" else bad_input)]


@pytest.mark.parametrize("kind, code", [("verify", 1), ("bad input", 2)])
def test_compile_exits_1_on_a_verify_failure_and_2_on_bad_input(demo_ckpt, tmp_path, capsys, monkeypatch, kind, code):
    import moec.compiler.compile as compile_mod

    monkeypatch.setattr(compile_mod, "STAGES", _stages(kind))
    got, out, err = run_cli(["compile", demo_ckpt, "-o", tmp_path / "new" / "c", "--target", "ort"], capsys)
    assert got == code, (out, err)
    assert "Traceback" not in err and err.startswith("error: ")
    assert ("verify failed" if kind == "verify" else "damaged") in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command, option", [
    (["build", "{src}", "-o", "{out}", "--no-progress"], "--max-batch"),
    (["build", "{src}", "-o", "{out}", "--no-progress"], "--max-new-tokens"),
    (["export", "{ck}", "-o", "{out}/m.onnx"], "--max-batch"),
    (["compile", "{ck}", "-o", "{out}", "--target", "ort"], "--max-batch"),
])
def test_a_dimension_no_engine_can_have_is_named_before_any_work(demo_ckpt, tmp_path, capsys, command, option):
    """Before: build ended in TensorRT's RuntimeError traceback (exit 1) for --max-batch 2**31."""
    pytest.importorskip("tensorrt_rtx")
    from test_build import write_moec_graph

    src = write_moec_graph(tmp_path / "src")
    args = [a.format(src=src, ck=demo_ckpt, out=tmp_path / "out") for a in command] + [option, str(1 << 31)]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "Traceback" not in err and "2147483647" in err, err
    assert not (tmp_path / "out").exists()
