"""``moec export`` end to end: the export runs on its own with ``moec run``; bad inputs leave nothing."""

from __future__ import annotations

import json
import shutil

from moec_cli import run_cli


def test_export_then_run_alone_with_external_data(demo_ckpt, tmp_path, capsys):
    out = tmp_path / "exp" / "tiny.onnx"
    code, stdout, err = run_cli(
        ["export", demo_ckpt, "-o", out, "--max-seq", "48", "--max-batch", "2", "--external-data-threshold", "0"], capsys
    )
    assert code == 0, err
    assert "exported fp32" in stdout and "tiny.onnx.data" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.moec.json", "tiny.onnx", "tiny.onnx.data", "tokenizer.json"]

    # The folder alone is enough to run it, wherever it goes.
    moved = shutil.copytree(out.parent, tmp_path / "elsewhere")
    code, stdout, err = run_cli(["run", moved / "tiny.onnx", "--prompt", "hello there", "--max-new-tokens", "3", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(stdout)["ids"]) >= 1

    # A prompt past the export's --max-seq.
    code, _, err = run_cli(["run", moved / "tiny.onnx", "--prompt-ids", " ".join(["1"] * 49)], capsys)
    assert code == 2 and "accepts at most 48 positions" in err

    # Missing external data: named, non-zero exit, nothing written.
    (moved / "tiny.onnx.data").unlink()
    before = sorted(p.name for p in moved.iterdir())
    code, _, err = run_cli(["run", moved / "tiny.onnx", "--prompt-ids", "1 2"], capsys)
    assert code == 2 and "tiny.onnx.data (missing)" in err and "Traceback" not in err
    assert sorted(p.name for p in moved.iterdir()) == before


def test_unknown_dtype_writes_nothing(demo_ckpt, tmp_path, capsys):
    out = tmp_path / "o" / "m.onnx"
    code, _, err = run_cli(["export", demo_ckpt, "-o", out, "--dtype", "fp8"], capsys)
    assert code == 2 and "'fp8' is not one of 'fp32', 'fp16', 'bf16'" in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_bad_checkpoint_writes_nothing(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    out = tmp_path / "o" / "m.onnx"
    code, _, err = run_cli(["export", tmp_path / "ckpt", "-o", out], capsys)
    assert code == 2 and "config.json" in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_file_or_missing_path_as_checkpoint(demo_onnx, tmp_path, capsys):
    """export, verify and run --checkpoint share one message for a file or a typo given as CHECKPOINT."""
    out = tmp_path / "o" / "x.onnx"
    for cmd in (["export", demo_onnx, "-o", out], ["verify", demo_onnx], ["run", demo_onnx, "--checkpoint", demo_onnx, "--prompt-ids", "1"]):
        code, _, err = run_cli(cmd, capsys)
        assert code == 2 and "CHECKPOINT must be a folder (got a file" in err and "JSON" not in err, (cmd, err)
    missing = tmp_path / "nonexist"
    for cmd in (["export", missing, "-o", out], ["verify", missing], ["run", demo_onnx, "--checkpoint", missing, "--prompt-ids", "1"]):
        code, _, err = run_cli(cmd, capsys)
        assert code == 2 and f"{missing} does not exist" in err and "no config.json" not in err, (cmd, err)
    assert not out.parent.exists()


def test_corrupt_tokenizer_stops_the_export(demo_ckpt, tmp_path, capsys):
    ckpt = shutil.copytree(demo_ckpt, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").write_bytes(b"\xff\xfe not json")
    out = tmp_path / "o" / "m.onnx"
    code, _, err = run_cli(["export", ckpt, "-o", out], capsys)
    assert code == 2 and f"{ckpt / 'tokenizer.json'}: not a usable tokenizer" in err and "Traceback" not in err
    assert "remove it to export without a tokenizer" in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
