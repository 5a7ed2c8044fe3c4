"""A command that fails leaves no partial and no empty artifact behind: not the output, not a
folder it made above it, not half of a file set (issue 11, "a failed command leaves no empty
output folder behind"). Each case writes under a folder that does not exist yet, fails on the
way, and checks that the folder is gone and that an earlier output is untouched."""

from __future__ import annotations

import errno
import shutil

import pytest

from moec.common import contract
from moec_cli import run_cli


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "no space left")


def _failed(code, err, *needles):
    assert code == 2 and "Traceback" not in err and err.startswith("error: "), err
    for n in needles:
        assert n.lower() in err.lower(), err


@pytest.fixture
def bad_shape_ckpt(demo_ckpt, tmp_path):
    """The demo checkpoint with one tensor of the wrong shape: found only while the export reads
    the checkpoint, after it has made its output folder."""
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(demo_ckpt, ck)
    state = load_file(ck / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"][:-1].clone()
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    return ck


def test_a_failed_export_leaves_no_empty_folder(bad_shape_ckpt, tmp_path, capsys):
    _failed(*run_cli(["export", bad_shape_ckpt, "-o", tmp_path / "new" / "deeper" / "m.onnx"], capsys)[::2],
            "model.norm.weight", "has shape")
    assert not (tmp_path / "new").exists()
    # an existing folder stays, with only what was there
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    _failed(*run_cli(["export", bad_shape_ckpt, "-o", tmp_path / "mine" / "m.onnx"], capsys)[::2], "has shape")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("failing", ["sidecar", "tokenizer"])
def test_a_failed_optimize_writes_no_part_of_its_file_set(demo_onnx, tmp_path, capsys, monkeypatch, failing):
    """Before: the graph was renamed into place first, then the sidecar and the tokenizer were
    written; a full disk at either left the new graph beside no sidecar (or an old one)."""
    import moec.compiler.pipeline as pipeline

    if failing == "sidecar":
        monkeypatch.setattr(pipeline, "write_json_atomic", _full_disk)
    else:
        monkeypatch.setattr(pipeline.shutil, "copyfile", _full_disk)
    _failed(*run_cli(["optimize", demo_onnx, "-o", tmp_path / "new" / "m.onnx"], capsys)[::2], "no space left")
    assert not (tmp_path / "new").exists()

    # An earlier output in the folder stays whole: the old graph with its own sidecar.
    monkeypatch.undo()
    out = tmp_path / "o" / "m.onnx"
    assert run_cli(["optimize", demo_onnx, "-o", out], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    assert {out.name, contract.sidecar_path(out).name, contract.TOKENIZER_FILE} <= set(before)
    if failing == "sidecar":
        monkeypatch.setattr(pipeline, "write_json_atomic", _full_disk)
    else:
        monkeypatch.setattr(pipeline.shutil, "copyfile", _full_disk)
    _failed(*run_cli(["optimize", demo_onnx, "-o", out, "--target", "trt-rtx:sm89"], capsys)[::2], "no space left")
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


def test_a_failed_partition_leaves_no_folder(demo_onnx, tmp_path, capsys, monkeypatch):
    import moec.compiler.partition as partition

    monkeypatch.setattr(partition, "write_json_atomic", _full_disk)
    _failed(*run_cli(["optimize", demo_onnx, "-o", tmp_path / "new" / "parts", "--tp", "2"], capsys)[::2],
            "no space left")
    assert not (tmp_path / "new").exists()


def test_a_failed_build_leaves_no_folder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    import moec.compiler.build.engine as build  # where build_engine looks build_serialized up
    from test_build import write_moec_graph

    src = write_moec_graph(tmp_path / "src")
    monkeypatch.setattr(build, "build_serialized", _full_disk)
    _failed(*run_cli(["build", src, "-o", tmp_path / "new" / "e", "--no-progress"], capsys)[::2], "no space left")
    assert not (tmp_path / "new").exists()


def test_a_failed_compile_or_quantize_leaves_no_folder(demo_ckpt, tmp_path, capsys, monkeypatch):
    """compile (its quantize step runs inside optimize) fails in its optimize stage: nothing stays,
    not the export it had already written into its work folder."""
    import moec.compiler.pipeline as pipeline

    monkeypatch.setattr(pipeline, "write_json_atomic", _full_disk)
    code, out, err = run_cli(["compile", demo_ckpt, "-o", tmp_path / "new" / "c", "--target", "ort", "--no-verify",
                              "--quantize", "int8", "--max-seq", "16"], capsys)
    assert code == 2 and "Traceback" not in err and "no space left" in err.lower(), (out, err)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

