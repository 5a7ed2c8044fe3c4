"""``moec build`` / ``moec compile`` without --layers-per-engine: one engine when its build fits the
host's memory, a chain of layer-range engines when it does not (compiler/build/split.py), with the
host's memory figure monkeypatched so either happens on any machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from moec_cli import run_cli  # noqa: E402

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler.build import BuildConfig
from moec.compiler.build import split as split_mod
from moec.compiler.build.chain import CHAIN_MANIFEST
from moec.compiler.build.split import ONE_ENGINE, choose_engine_split, host_available_bytes
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.compiler.plan import BUILD_RSS_BASE, build_host_bytes, onnx_weight_bytes

LAYERS = 4  # llama4-tiny


@pytest.fixture(scope="module")
def opt_onnx(demo_onnx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split_opt") / "model.onnx"
    optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt-rtx:sm89"))
    return out


@pytest.fixture(scope="module")
def weights(opt_onnx) -> int:
    import onnx

    return onnx_weight_bytes(onnx.load(str(opt_onnx), load_external_data=False))


def _two_layers_fit(weights: int) -> int:
    """A host with room for the libraries and two layers' share at 1.8x, not for one engine."""
    return BUILD_RSS_BASE + int(1.8 * weights / LAYERS * 2) + 1


def test_auto_keeps_one_engine_when_it_fits(opt_onnx, weights):
    split = choose_engine_split(opt_onnx, None, host=build_host_bytes(weights))
    assert split.layers_per_engine is None and split.note == ""
    assert split.build_host_bytes_estimate == build_host_bytes(weights) and split.weight_bytes == weights


def test_auto_chooses_the_chain_that_fits_and_says_why(opt_onnx, weights):
    host = _two_layers_fit(weights)
    split = choose_engine_split(opt_onnx, "auto", host=host)
    assert split.layers_per_engine == 2 and split.requested == "auto" and split.host_available_bytes == host
    assert "as one engine needs about" in split.note and f"--layers-per-engine {ONE_ENGINE}" in split.note
    # Not even one layer's share fits: still the smallest chain (one layer each), said so.
    tiny = choose_engine_split(opt_onnx, None, host=BUILD_RSS_BASE)
    assert tiny.layers_per_engine == 1 and "larger host" in tiny.note


def test_auto_keeps_one_engine_for_a_model_with_a_vision_graph(opt_onnx, weights, monkeypatch):
    # A chain runs text only: the vision engines would be lost.
    monkeypatch.setattr(split_mod, "_has_vision_graph", lambda path: True)
    split = choose_engine_split(opt_onnx, None, host=_two_layers_fit(weights))
    assert split.layers_per_engine is None and "vision graph" in split.note


def test_all_forces_one_engine_and_a_count_is_kept(opt_onnx, weights):
    forced = choose_engine_split(opt_onnx, ONE_ENGINE, host=_two_layers_fit(weights))
    assert forced.layers_per_engine is None and "may run out of memory" in forced.note
    assert choose_engine_split(opt_onnx, 3, host=1).layers_per_engine == 3


def test_bad_values_are_named():
    for bad in (0, -1, "some", True):
        with pytest.raises(MoecError, match="give at least 1"):
            BuildConfig(layers_per_engine=bad)
    BuildConfig(layers_per_engine=ONE_ENGINE)


def test_host_available_is_at_most_the_physical_memory():
    import os

    assert 0 < host_available_bytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _build(opt_onnx, out: Path, capsys, *extra):
    return run_cli(["build", opt_onnx, "-o", out, "--builder", "trt-rtx", "--no-progress", *extra], capsys)


@pytest.mark.trt
def test_cli_builds_a_chain_when_one_engine_does_not_fit(opt_onnx, weights, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    monkeypatch.setattr(split_mod, "host_available_bytes", lambda: _two_layers_fit(weights))
    code, out, err = _build(opt_onnx, tmp_path / "eng", capsys)
    assert code in (0, None), err
    assert "note:" in err and f"--layers-per-engine {ONE_ENGINE}" in err
    chain = json.loads((tmp_path / "eng" / CHAIN_MANIFEST).read_text())
    assert [r["layers"] for r in chain["ranges"]] == [[0, 2], [2, 4]]
    assert chain["engine_split"]["requested"] == "auto" and chain["engine_split"]["layers_per_engine"] == 2
    assert chain["engine_split"]["host_available_bytes"] == _two_layers_fit(weights)
    assert "2 layer-range engines" in out


@pytest.mark.trt
def test_cli_keeps_one_engine_when_it_fits_and_when_forced(opt_onnx, weights, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    monkeypatch.setattr(split_mod, "host_available_bytes", lambda: build_host_bytes(weights) + 1)
    code, out, err = _build(opt_onnx, tmp_path / "fits", capsys)
    assert code in (0, None), err
    assert not (tmp_path / "fits" / CHAIN_MANIFEST).exists() and "as one engine needs" not in err
    m = json.loads((tmp_path / "fits" / contract.ENGINE_MANIFEST).read_text())
    assert m["engine_split"]["requested"] == "auto" and m["engine_split"]["layers_per_engine"] is None

    monkeypatch.setattr(split_mod, "host_available_bytes", lambda: _two_layers_fit(weights))
    code, out, err = _build(opt_onnx, tmp_path / "forced", capsys, "--layers-per-engine", ONE_ENGINE)
    assert code in (0, None), err
    assert not (tmp_path / "forced" / CHAIN_MANIFEST).exists() and "warning:" in err and "may run out" in err
    m = json.loads((tmp_path / "forced" / contract.ENGINE_MANIFEST).read_text())
    assert m["engine_split"]["requested"] == ONE_ENGINE and (tmp_path / "forced" / "engine.sm89.plan").is_file()


def test_cli_refuses_a_bad_value_without_output(opt_onnx, tmp_path, capsys):
    code, out, err = _build(opt_onnx, tmp_path / "eng", capsys, "--layers-per-engine", "none")
    assert code == 2 and "--layers-per-engine" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.trt
@pytest.mark.slow  # a whole compile: export, optimize, four engines
def test_compile_chooses_the_chain_on_a_small_host(demo_ckpt, tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    from moec.compiler.compile import CompileConfig, compile_checkpoint

    # Whatever the weights, a host with room for the libraries only: one layer per engine.
    monkeypatch.setattr(split_mod, "host_available_bytes", lambda: BUILD_RSS_BASE)
    report = compile_checkpoint(demo_ckpt, tmp_path / "out", CompileConfig(verify=False, progress=False))
    build = next(s for s in report.stages if s.stage == "build")
    assert "layer-range engines" in build.detail and f"--layers-per-engine {ONE_ENGINE}" in build.detail
    chain = json.loads((Path(report.artifacts["engine"]) / CHAIN_MANIFEST).read_text())
    assert chain["engine_split"]["layers_per_engine"] == 1 and len(chain["ranges"]) == LAYERS
