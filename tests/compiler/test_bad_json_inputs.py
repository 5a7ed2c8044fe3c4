"""Every JSON file moec reads (bench results, a checkpoint's config.json and index, a partition's
parallel.json, a multi-rank engine manifest) that is nested too deep, not an object, or has a
missing or mistyped field is one named error with exit 2, never a traceback (exit 1 would mean
"regression" to `moec gate`); every path in a partition manifest is a plain file name inside its
folder (issue 11, "no traceback, ever" and "confinement")."""

from __future__ import annotations

import json
import shutil

import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec_cli import run_cli

DEEP = "[" * 100000 + "]" * 100000


def _one_error_line(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n.lower() in err.lower(), err


def test_gate_names_a_result_nested_too_deep(tmp_path, capsys):
    from test_gate import result

    (tmp_path / "deep.json").write_text(DEEP)
    (tmp_path / "base.json").write_text(json.dumps(result()))
    _one_error_line(*run_cli(["gate", tmp_path / "deep.json", "--baseline", tmp_path / "base.json"], capsys)[::2],
                    "deep.json is not valid JSON")
    _one_error_line(*run_cli(["gate", tmp_path / "base.json", "--baseline", tmp_path / "deep.json"], capsys)[::2],
                    "deep.json is not valid JSON")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_checkpoint_json_nested_too_deep_is_named(demo_ckpt, tmp_path, capsys, name):
    ck = tmp_path / "ck"
    shutil.copytree(demo_ckpt, ck)
    (ck / name).write_text(DEEP)
    _one_error_line(*run_cli(["run", ck, "--prompt-ids", "1 2"], capsys)[::2], name)


def _partition_folder(tmp_path, **changes):
    folder = tmp_path / "parts"
    folder.mkdir(exist_ok=True)
    manifest = {"format": contract.PARALLEL_FORMAT, "world_size": 1, "tp": 1, "ep": 1, "partition_id": "p",
                "ranks": [{"rank": 0, "file": "rank0.onnx", "sha256": "0" * 64}]}
    manifest.update(changes)
    (folder / contract.PARALLEL_MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("changes, needle", [
    ({"ranks": [{"rank": 0, "file": "../../x.onnx", "sha256": "0"}]}, "ranks[0].file names '../../x.onnx'"),
    ({"ranks": [{"rank": 0, "file": "/etc/passwd", "sha256": "0"}]}, "ranks[0].file names '/etc/passwd'"),
    ({"ranks": [{"rank": 0, "file": "sub/rank0.onnx", "sha256": "0"}]}, "not a plain file name"),
    ({"ranks": [{"rank": 0, "file": "link.onnx", "sha256": "0"}]}, "outside"),
    ({"ranks": [3]}, "ranks[0] is not an object"),
    ({"ranks": [{"rank": "0", "file": "rank0.onnx", "sha256": "0"}]}, "ranks[0] is not an object"),
    ({"world_size": None}, "world_size is None"),
    ({"tp": "2"}, "tp is '2'"),
    ({"partition_id": 7}, "partition_id is 7"),
])
def test_a_partition_manifest_is_checked_field_by_field_and_path_by_path(tmp_path, changes, needle):
    from moec.runtime.parallel.rankset import check_rank_set

    (tmp_path / "secret.onnx").write_bytes(b"not yours")
    folder = _partition_folder(tmp_path, **changes)
    (folder / "link.onnx").symlink_to(tmp_path / "secret.onnx")
    with pytest.raises(MoecError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check_rank_set(folder)


def test_run_names_a_partition_manifest_nested_too_deep(tmp_path, capsys):
    folder = _partition_folder(tmp_path)
    (folder / contract.PARALLEL_MANIFEST).write_text(DEEP)
    from moec.runtime.parallel.rankset import check_rank_set

    with pytest.raises(MoecError, match="not valid JSON"):
        check_rank_set(folder)
    _one_error_line(*run_cli(["run", folder, "--prompt-ids", "1 2"], capsys)[::2], "not valid JSON")


@pytest.mark.parametrize("content, needle", [
    (DEEP, "not valid JSON"),
    ("[1, 2]", "not a moec multi-rank engine manifest"),
    ({"world_size": 1, "archs": ["sm89"], "partition_id": "p",
      "ranks": [{"rank": 0, "dir": "../elsewhere", "engines": []}]}, "rank 0 dir names '../elsewhere'"),
    ({"world_size": 1, "archs": ["sm89"], "partition_id": "p", "ranks": [{"rank": 0}]}, "lacks or mistypes a field"),
    ({"archs": ["sm89"], "ranks": []}, "lacks or mistypes a field"),
])
def test_a_multi_rank_engine_manifest_is_named_not_a_traceback(tmp_path, content, needle):
    from moec.compiler.build.parallel import ENGINES_FORMAT, load_rank_engines

    folder = tmp_path / "engines"
    folder.mkdir()
    if isinstance(content, dict):
        content = json.dumps({"format": ENGINES_FORMAT, **content})
    (folder / contract.PARALLEL_MANIFEST).write_text(content)
    with pytest.raises(MoecError, match=needle.replace("[", r"\[")):
        load_rank_engines(folder)
