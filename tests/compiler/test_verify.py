"""verify: Polygraphy's comparison of ONNX Runtime against torch, per output and step."""

from __future__ import annotations

import json

import shutil

import numpy as np
import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler import verify as verify_mod
from moec.compiler.cli import main
from moec.compiler.verify import VerifyConfig, _compare, format_report, verify_backends


@pytest.fixture(scope="module")
def backends(demo_ckpt, demo_onnx):
    from moec.models.torch_backend import TorchBackend
    from moec.runtime.ort_backend import OrtBackend

    return TorchBackend.from_checkpoint(demo_ckpt, dtype="fp32"), OrtBackend.from_onnx(demo_onnx)


def test_polygraphy_semantics_fail_only_when_both_tolerances_exceeded():
    ref = {"x": np.array([100.0, 1.0], dtype=np.float32)}
    # 0.05 abs on 100 is 5e-4 rel: over atol 1e-2, under rtol 1e-3 -> passes.
    assert bool(_compare({"x": np.array([100.05, 1.0], np.float32)}, ref, atol=1e-2, rtol=1e-3)["x"])
    # 5e-3 abs on 1.0 is 5e-3 rel: under atol 1e-2 -> passes.
    assert bool(_compare({"x": np.array([100.0, 1.005], np.float32)}, ref, atol=1e-2, rtol=1e-3)["x"])
    # 0.05 abs on 1.0: both exceeded -> fails.
    r = _compare({"x": np.array([100.0, 1.05], np.float32)}, ref, atol=1e-2, rtol=1e-3)["x"]
    assert not bool(r) and r.max_absdiff == pytest.approx(0.05, rel=1e-4)


def test_fp32_export_verifies(backends, demo_ckpt):
    from moec.models import Llama4Config

    cfg = Llama4Config.from_pretrained(demo_ckpt)
    report = verify_backends(*backends, VerifyConfig(decode_steps=4), cfg.vocab_size, cfg.attention_chunk_size)
    assert report.prompt_len == 2 * cfg.attention_chunk_size + 3
    outputs_per_step = 1 + 2 * cfg.num_hidden_layers
    assert len(report.rows) == 5 * outputs_per_step
    assert [r.step for r in report.rows[::outputs_per_step]] == ["prefill", "decode 1", "decode 2", "decode 3", "decode 4"]
    assert report.passed and report.greedy_match == [True] * 5
    assert report.max_abs("logits") <= 1e-4
    assert "PASSED" in format_report(report)


def test_verify_detects_a_wrong_weight(demo_ckpt, backends):
    """A small change to one lm_head row must show up in the logits rows only."""
    import torch

    from moec.models import Llama4Config, load_pretrained
    from moec.models.torch_backend import TorchBackend

    cfg = Llama4Config.from_pretrained(demo_ckpt)
    model = load_pretrained(demo_ckpt)
    with torch.no_grad():
        model.lm_head.weight[7] += 0.05
    report = verify_backends(
        TorchBackend(model, cfg), backends[1], VerifyConfig(decode_steps=1), cfg.vocab_size, cfg.attention_chunk_size
    )
    assert not report.passed
    assert {r.output for r in report.failures} == {"logits"}
    assert "FAILED" in format_report(report)


def test_bad_config():
    with pytest.raises(MoecError, match="unknown dtype"):
        VerifyConfig(dtype="int8")
    with pytest.raises(MoecError, match="atol must be >= 0"):
        VerifyConfig(atol=-1.0)
    assert VerifyConfig(dtype="fp16").tolerances == verify_mod.DEFAULT_TOLERANCES["fp16"]
    assert VerifyConfig(atol=1.0).tolerances == (1.0, verify_mod.DEFAULT_TOLERANCES["fp32"][1])


def _reuse_export(demo_onnx, monkeypatch):
    """verify() exports first; reuse the session's fp32 export instead (export has its own tests)."""
    from moec.compiler import export as export_mod

    def copy_export(checkpoint, out, config):
        assert config.dtype == "fp32"
        shutil.copyfile(demo_onnx, out)
        shutil.copyfile(contract.sidecar_path(demo_onnx), contract.sidecar_path(out))
        shutil.copyfile(demo_onnx.with_name(contract.TOKENIZER_FILE), out.with_name(contract.TOKENIZER_FILE))

    monkeypatch.setattr(export_mod, "export_onnx", copy_export)


def test_cli_verify_passes(demo_ckpt, demo_onnx, monkeypatch, capsys):
    _reuse_export(demo_onnx, monkeypatch)
    main(["verify", str(demo_ckpt), "--decode-steps", "2"])
    out = capsys.readouterr().out
    assert "prefill    logits" in out and "decode 2" in out and "PASSED" in out


def test_cli_verify_fails_with_exit_1(demo_ckpt, demo_onnx, monkeypatch, capsys):
    _reuse_export(demo_onnx, monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["verify", str(demo_ckpt), "--decode-steps", "1", "--atol", "0", "--rtol", "0"])
    assert e.value.code == 1
    assert "FAILED" in capsys.readouterr().out


def test_cli_verify_failure_json_is_pure_json(demo_ckpt, demo_onnx, monkeypatch, capsys):
    """Polygraphy prints failures as [E] lines on stdout; under --json nothing but JSON may be there."""
    _reuse_export(demo_onnx, monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["verify", str(demo_ckpt), "--decode-steps", "1", "--atol", "0", "--rtol", "0", "--json"])
    assert e.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["rows"]


def test_cli_verify_unknown_dtype(demo_ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", str(demo_ckpt), "--dtype", "fp64"])
    assert e.value.code == 2
    assert "'fp64' is not one of 'fp32', 'fp16', 'bf16'" in capsys.readouterr().err  # a choice, as in every command


@pytest.mark.slow
def test_cli_verify_end_to_end(demo_ckpt, capsys):
    """The real thing: export into a temporary folder, compare, clean up."""
    main(["verify", str(demo_ckpt), "--decode-steps", "2", "--batch", "1"])
    assert "PASSED" in capsys.readouterr().out
