"""A model and its tokenizer stay paired: tokenizer.json has one fixed name per folder, so the
sidecar records its sha256 and every writer and reader checks it."""

from __future__ import annotations

import json
import shutil

import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler.cli import main


def _other_tokenizer(src, dest):
    tok = json.loads(src.read_text())
    tok["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    dest.write_text(json.dumps(tok))


def test_export_records_the_tokenizer_sha256(demo_ckpt, demo_onnx):
    from moec.common.artifacts import sha256_file

    side = json.loads(contract.sidecar_path(demo_onnx).read_text())
    assert side["tokenizer_sha256"] == sha256_file(demo_ckpt / contract.TOKENIZER_FILE)


def test_export_refuses_a_folder_holding_another_models_tokenizer(demo_ckpt, tmp_path):
    from moec.compiler.export import ExportConfig, export_onnx

    _other_tokenizer(demo_ckpt / contract.TOKENIZER_FILE, tmp_path / contract.TOKENIZER_FILE)
    before = (tmp_path / contract.TOKENIZER_FILE).read_bytes()
    with pytest.raises(MoecError, match="already holds a different tokenizer"):
        export_onnx(demo_ckpt, tmp_path / "b.onnx", ExportConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == [contract.TOKENIZER_FILE]
    assert (tmp_path / contract.TOKENIZER_FILE).read_bytes() == before


def test_run_refuses_a_tokenizer_that_is_not_the_models(demo_onnx, tmp_path, capsys):
    model = tmp_path / "model.onnx"
    shutil.copyfile(demo_onnx, model)
    shutil.copyfile(contract.sidecar_path(demo_onnx), contract.sidecar_path(model))
    _other_tokenizer(demo_onnx.with_name(contract.TOKENIZER_FILE), tmp_path / contract.TOKENIZER_FILE)
    with pytest.raises(SystemExit) as e:
        main(["run", str(model), "--prompt", "Hello world", "--max-new-tokens", "1"])
    assert e.value.code == 2
    assert "is not the tokenizer" in capsys.readouterr().err
    # Its own tokenizer runs.
    shutil.copyfile(demo_onnx.with_name(contract.TOKENIZER_FILE), tmp_path / contract.TOKENIZER_FILE)
    with pytest.raises(SystemExit) as e:
        main(["run", str(model), "--prompt", "Hello world", "--max-new-tokens", "1", "--json"])
        raise SystemExit(0)
    assert e.value.code == 0
    assert len(json.loads(capsys.readouterr().out)["prompt_ids"]) > 3


def test_optimize_refuses_a_folder_holding_another_models_tokenizer(demo_onnx, tmp_path):
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    _other_tokenizer(demo_onnx.with_name(contract.TOKENIZER_FILE), tmp_path / contract.TOKENIZER_FILE)
    with pytest.raises(MoecError, match="already holds a different tokenizer"):
        optimize_onnx(demo_onnx, tmp_path / "opt.onnx", OptimizeConfig(target="ort"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [contract.TOKENIZER_FILE]
