"""`moec export --vision` writes the text graph and its vision graph as one set: a failure in either leaves
neither, and an earlier pair stays whole (compiler/export_vision.export_text_and_vision)."""

import pytest
from moec_cli import run_cli

from moec.common.errors import MoecError
from moec.models.demo import write_demo_checkpoint

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def mm_ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("pair") / "ckpt", layout="conditional_generation",
                                 vision=True)


ARGS = ["--max-seq", 32]


def test_both_graphs_land_beside_each_other(mm_ckpt, tmp_path, capsys):
    code, out, err = run_cli(["export", mm_ckpt, "-o", tmp_path / "out" / "m.onnx", "--vision", *ARGS], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["m.moec.json", "m.onnx", "m.vision.moec.json", "m.vision.onnx", "tokenizer.json"], names


@pytest.mark.parametrize("broken", ["text", "vision"])
def test_a_failure_in_either_graph_leaves_neither(broken, mm_ckpt, tmp_path, capsys, monkeypatch):
    import moec.compiler.export as export_mod
    import moec.compiler.export_vision as vision_mod

    def fail(*a, **k):
        raise MoecError(f"the {broken} export failed here (test)")

    monkeypatch.setattr(export_mod if broken == "text" else vision_mod,
                        "export_onnx" if broken == "text" else "export_vision_onnx", fail)
    code, _, err = run_cli(["export", mm_ckpt, "-o", tmp_path / "new" / "m.onnx", "--vision", *ARGS], capsys)
    assert code == 2 and f"the {broken} export failed here" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # no graph, no staging folder, not even the folder it made


def test_an_earlier_pair_stays_whole_when_the_text_export_fails(mm_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out" / "m.onnx"
    assert run_cli(["export", mm_ckpt, "-o", out, "--vision", *ARGS], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    import moec.compiler.export as export_mod

    monkeypatch.setattr(export_mod, "export_onnx", lambda *a, **k: (_ for _ in ()).throw(MoecError("no room (test)")))
    assert run_cli(["export", mm_ckpt, "-o", out, "--vision", *ARGS], capsys)[0] == 2
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before
