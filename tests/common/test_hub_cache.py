"""Hugging Face Hub ids as CHECKPOINT: read from the local cache, offline; a one-line refusal
that says how to download otherwise (moec.common.hub)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moec.common.errors import MoecError
from moec.common.hub import resolve_checkpoint
from moec_cli import run_cli

REPO = "meta-llama/Llama-4-Tiny-Test"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root, files: dict[str, str]):
    """The layout huggingface_hub writes: models--OWNER--NAME/{refs/main, snapshots/COMMIT/...}."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the lookup must not need the network
    monkeypatch.chdir(tmp_path)  # so "meta-llama/..." is not a folder by accident
    return root


def test_a_cached_id_is_its_snapshot_folder(hub_cache, capsys):
    from moec.models.config import CAUSAL_LM, Llama4Config

    config = Llama4Config.preset("llama4-tiny").to_hf_config(CAUSAL_LM)
    snap = fake_cache(hub_cache, {"config.json": json.dumps(config)})
    assert resolve_checkpoint(REPO) == snap
    # plan reads config.json only: the whole command runs on the cached id.
    code, out, err = run_cli(["plan", REPO, "--gpu", "h100", "--gpus", "1", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["gpu"]


def test_an_id_not_in_the_cache_says_how_to_download(hub_cache, capsys):
    with pytest.raises(MoecError, match=rf"local Hugging Face cache \({hub_cache}\) does not hold the model {REPO}.*"
                                        rf"hf download {REPO}"):
        resolve_checkpoint(REPO)
    for argv in (["export", REPO, "-o", "x.onnx"], ["compile", REPO, "-o", "out"], ["verify", REPO]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (argv, err)
        assert f"hf download {REPO}" in err
    assert sorted(p.name for p in hub_cache.parent.iterdir()) == ["hf-cache"]  # nothing written


def test_paths_are_never_looked_up(hub_cache, tmp_path):
    (tmp_path / "local" / "ckpt").mkdir(parents=True)
    assert resolve_checkpoint("local/ckpt") == Path("local/ckpt")  # an existing folder wins
    assert str(resolve_checkpoint(str(tmp_path / "gone"))) == str(tmp_path / "gone")  # absolute: the old message
    assert str(resolve_checkpoint("out/model.onnx")) == "out/model.onnx"
    shutil.rmtree(tmp_path / "local")
