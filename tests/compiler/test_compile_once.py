"""`moec compile` says a failed stage's message once (the `error:` line), not again in its table."""

from __future__ import annotations

import pytest

from moec.common.errors import MoecError
from moec_cli import run_cli


def test_a_failed_stage_is_said_once(tmp_path, capsys, monkeypatch):
    import moec.compiler.compile as compile_mod

    def failing(state):
        raise MoecError("the export found something wrong in layer 3; fix it")

    monkeypatch.setattr(compile_mod, "STAGES", [("checkpoint", compile_mod.stage_checkpoint), ("export", failing)])
    code, out, err = run_cli(["compile", "-o", tmp_path / "out", "--target", "ort"], capsys)
    assert code == 2
    assert (out + err).count("something wrong in layer 3") == 1, out + err
    assert err.strip().splitlines()[-1] == "error: export stage: the export found something wrong in layer 3; fix it"
    assert "FAILED" in out and "checkpoint: demo llama4-tiny" in out  # the table still shows where it stopped
    assert not (tmp_path / "out").exists()


def test_a_failed_verify_keeps_its_table_detail(tmp_path, capsys, monkeypatch):
    """A stage whose detail differs from its error (verify: what was compared) keeps the detail; a
    verify failure exits 1 (the compiled graph is wrong), not 2 (bad input)."""
    import moec.compiler.compile as compile_mod
    from moec.compiler.compile import StageRecord

    def failing_verify(state):
        raise compile_mod._StageFailed(StageRecord("verify", 0.0, "FAILED", "model.opt.onnx in ORT vs torch fp32"),
                                       "verify failed: 2 of 9 comparisons out of tolerance")

    monkeypatch.setattr(compile_mod, "STAGES", [("checkpoint", compile_mod.stage_checkpoint), ("verify", failing_verify)])
    code, out, err = run_cli(["compile", "-o", tmp_path / "out", "--target", "ort"], capsys)
    assert code == 1 and "verify: model.opt.onnx in ORT vs torch fp32" in out
    assert (out + err).count("2 of 9 comparisons") == 1


@pytest.mark.parametrize("precision, dtype, ok", [("fp32", None, True), ("fp32", "bf16", False)])
def test_precision_fp32_means_an_fp32_graph(tmp_path, precision, dtype, ok):
    from moec.compiler.compile import CompileConfig, resolve_dtype

    config = CompileConfig(precision=precision, dtype=dtype)
    if ok:
        assert resolve_dtype(config, tmp_path)[0] == "fp32"
    else:
        with pytest.raises(MoecError, match="--precision fp32 keeps an fp32 graph"):
            resolve_dtype(config, tmp_path)
