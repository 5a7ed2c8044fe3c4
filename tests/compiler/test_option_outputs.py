"""Options that write (--report, --json, --junit, --timing-cache, --dump-dir) never overwrite an
input of the command or a file of another kind (issue 11, "data safety"); each refusal comes
before any work, exit 2, and the file is unchanged."""

from __future__ import annotations

import json
import shutil

from moec.common import contract
from moec_cli import run_cli
from test_gate import result as bench_result


def _bench_result(path):
    path.write_text(json.dumps(bench_result()))
    return path


def test_gate_junit_never_overwrites_the_result_the_baseline_or_another_file(tmp_path, capsys):
    res, base = _bench_result(tmp_path / "r.json"), _bench_result(tmp_path / "b.json")
    before = base.read_text()
    code, _, err = run_cli(["gate", res, "--baseline", base, "--junit", base], capsys)
    assert code == 2 and "an input of this command" in err and base.read_text() == before
    notes = tmp_path / "notes.xml"
    notes.write_text("<notes>mine</notes>")
    code, _, err = run_cli(["gate", res, "--baseline", base, "--junit", notes], capsys)
    assert code == 2 and "is not a moec gate JUnit file" in err and notes.read_text() == "<notes>mine</notes>"
    # An earlier JUnit file of the gate is replaced.
    junit = tmp_path / "gate.xml"
    assert run_cli(["gate", res, "--baseline", base, "--junit", junit], capsys)[0] == 0
    assert run_cli(["gate", res, "--baseline", base, "--junit", junit], capsys)[0] == 0
    assert "moec.gate" in junit.read_text()


def test_bench_json_never_overwrites_a_file_of_another_kind(tmp_path, demo_onnx, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    code, _, err = run_cli(["bench", demo_onnx, "--json", notes, "--repeats", "1"], capsys)
    assert code == 2 and "is not a moec bench result" in err and notes.read_text() == '{"mine": true}'


def test_optimize_report_and_dump_dir_never_overwrite_inputs_or_user_files(tmp_path, demo_onnx, capsys):
    src = tmp_path / "src"
    shutil.copytree(demo_onnx.parent, src)
    model = src / demo_onnx.name
    side = contract.sidecar_path(model)
    before = side.read_text()
    code, _, err = run_cli(["optimize", model, "-o", tmp_path / "o" / "m.onnx", "--json-out", side], capsys)
    assert code == 2 and "an input of this command" in err and side.read_text() == before
    notes = tmp_path / "notes.json"
    notes.write_text("[1, 2]")
    code, _, err = run_cli(["optimize", model, "-o", tmp_path / "o" / "m.onnx", "--json-out", notes], capsys)
    assert code == 2 and "is not a moec optimize report" in err and notes.read_text() == "[1, 2]"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "00_input.onnx").write_text("my own file of that name")
    code, _, err = run_cli(["optimize", model, "-o", tmp_path / "o" / "m.onnx", "--dump-dir", mine], capsys)
    assert code == 2 and "not an earlier --dump-dir folder" in err
    assert (mine / "00_input.onnx").read_text() == "my own file of that name"
    code, _, err = run_cli(["optimize", model, "-o", tmp_path / "o" / "m.onnx", "--dump-dir", src], capsys)
    assert code == 2 and "holds the input" in err
    assert not (tmp_path / "o").exists()
