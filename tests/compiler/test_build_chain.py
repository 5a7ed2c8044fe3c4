"""``moec build --layers-per-engine N``: the demo graph cut into layer ranges and built as a chain of
TensorRT-RTX engines (sm89, on the CPU), one after another."""

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
from moec.compiler.build.chain import (
    CHAIN_MANIFEST,
    build_layer_chain,
    chain_tokenizer,
    load_layer_chain,
)
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.runtime.layer_chain import cut_layer_ranges, residual_name

LAYERS = 4  # llama4-tiny


@pytest.fixture(scope="module")
def opt_onnx(demo_onnx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chain_opt") / "model.onnx"
    optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt-rtx:sm89"))
    return out


def _structure(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _config() -> BuildConfig:
    return BuildConfig(archs=("sm89",), backend="tensorrt-rtx", progress=False)


def test_cut_fires_at_layer_boundaries_passing_only_the_residual_stream(opt_onnx):
    ranges = cut_layer_ranges(_structure(opt_onnx), LAYERS, 2)
    assert [(r.first, r.end) for r in ranges] == [(0, 2), (2, 4)]
    first, last = ranges
    assert residual_name(2) == "hidden.2"
    assert [n for n in first.outputs if not n.startswith("present_")] == ["hidden.2"]
    assert [n for n in last.inputs if n not in (contract.INPUT_IDS, contract.POSITION_IDS)
            and not n.startswith("past_")] == ["hidden.2"]
    assert contract.LOGITS in last.outputs and contract.LOGITS not in first.outputs
    for r in ranges:
        own = {contract.present_key(i) for i in range(r.first, r.end)} | {contract.present_value(i) for i in range(r.first, r.end)}
        assert {n for n in r.outputs if n.startswith("present_")} == own
        # Every layer's weights, the embedding and the lm_head live in exactly one range.
        names = [t.name for t in r.model.graph.initializer]
        layers = {int(n.split("layers.")[1].split(".")[0]) for n in names if "layers." in n}
        assert layers <= set(range(r.first, r.end))
    assert any(t.name.startswith("model.embed_tokens") for t in first.model.graph.initializer)
    assert any(t.name.startswith("lm_head") for t in last.model.graph.initializer)
    assert not any(t.name.startswith("lm_head") for t in first.model.graph.initializer)


def test_one_range_when_it_holds_every_layer(opt_onnx):
    model = _structure(opt_onnx)
    (only,) = cut_layer_ranges(model, LAYERS, LAYERS)
    assert set(only.inputs) == {i.name for i in model.graph.input}
    assert set(only.outputs) == {o.name for o in model.graph.output}
    assert len(only.model.graph.node) == len(model.graph.node)
    assert not any(n.startswith("hidden.") for n in only.inputs + only.outputs)


@pytest.mark.parametrize("n,message", [(0, "give at least 1"), (5, "exceeds the model's 4 layers")])
def test_bad_layers_per_engine_is_named(opt_onnx, tmp_path, n, message):
    with pytest.raises(MoecError, match=message):
        cut_layer_ranges(_structure(opt_onnx), LAYERS, n)
    with pytest.raises(MoecError, match=message):
        if n < 1:
            BuildConfig(layers_per_engine=n)
        build_layer_chain(opt_onnx, tmp_path / "eng", _config(), n)
    assert not (tmp_path / "eng").exists()


def test_cli_refuses_too_many_layers_per_engine_without_output(opt_onnx, tmp_path, capsys):
    code, out, err = run_cli(["build", opt_onnx, "-o", tmp_path / "eng", "--backend", "tensorrt-rtx", "--no-progress",
                              "--layers-per-engine", "9"], capsys)
    assert code == 2 and "exceeds the model's 4 layers" in err and "Traceback" not in err
    code, out, err = run_cli(["build", opt_onnx, "-o", tmp_path / "eng", "--layers-per-engine", "0"], capsys)
    assert code == 2 and "--layers-per-engine" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def chain_dir(opt_onnx, tmp_path_factory) -> Path:
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path_factory.mktemp("chain_eng") / "eng"
    build_layer_chain(opt_onnx, out, _config(), 2)
    return out


@pytest.mark.trt
def test_real_tensorrt_rtx_chain_of_two_engines(chain_dir, opt_onnx):
    chain, engines = load_layer_chain(chain_dir)
    assert [r["layers"] for r in chain["ranges"]] == [[0, 2], [2, 4]]
    assert [e.parent.name for e in engines] == ["layers0-1", "layers2-3"]
    for r in chain["ranges"]:
        m = json.loads((chain_dir / r["dir"] / contract.ENGINE_MANIFEST).read_text())
        # The engine's real I/O (TensorRT's network) is the range's: the runtime binds these names.
        assert [t["name"] for t in m["io"]["inputs"]] == r["inputs"]
        assert [t["name"] for t in m["io"]["outputs"]] == r["outputs"]
        assert m["layer_range"]["layers"] == r["layers"]
    io0 = json.loads((chain_dir / "layers0-1" / contract.ENGINE_MANIFEST).read_text())["io"]
    hidden = next(t for t in io0["outputs"] if t["name"] == "hidden.2")
    assert hidden["shape"][:2] == [-1, -1] and hidden["shape"][2] > 0
    assert chain["weight_bytes"] >= sum(r["weight_bytes"] for r in chain["ranges"]) - 4096
    assert chain["memory"]["weight_bytes"] > 0 and chain["limits"]["max_past"] >= 1


@pytest.mark.trt
def test_inspect_shows_the_chain_and_names_a_tampered_engine(chain_dir, tmp_path, capsys):
    code, out, err = run_cli(["inspect", chain_dir], capsys)
    assert code in (0, None), err
    assert "2 layer-range engines" in out and "layers 0-1" in out and "hidden.2 -> logits" in out
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(chain_dir, copy)
    plan = copy / "layers2-3" / "engine.sm89.plan"
    plan.write_bytes(plan.read_bytes()[:-1] + b"\0")
    with pytest.raises(MoecError, match="sha256 differs"):
        load_layer_chain(copy)
    code, out, err = run_cli(["inspect", copy], capsys)
    assert code == 2 and "sha256 differs" in err
    chain = json.loads((copy / CHAIN_MANIFEST).read_text())
    del chain["ranges"][1]
    (copy / CHAIN_MANIFEST).write_text(json.dumps(chain))
    with pytest.raises(MoecError, match="incomplete"):
        load_layer_chain(copy)


@pytest.mark.trt
def test_a_failing_range_leaves_no_partial_folder(opt_onnx, tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    import moec.compiler.build.engine as engine

    real = engine.build_engine
    calls = []

    def second_fails(onnx_path, out_dir, config, display=None, layer_range=None):
        calls.append(layer_range.index)
        if layer_range.index == 1:
            raise MoecError("range 1 failed")
        return real(onnx_path, out_dir, config, display, layer_range=layer_range)

    monkeypatch.setattr(engine, "build_engine", second_fails)
    with pytest.raises(MoecError, match="range 1 failed"):
        build_layer_chain(opt_onnx, tmp_path / "eng", _config(), 2)
    assert calls == [0, 1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.trt
def test_without_the_option_one_engine_and_no_chain(opt_onnx, tmp_path, capsys):
    code, out, err = run_cli(["build", opt_onnx, "-o", tmp_path / "eng", "--backend", "tensorrt-rtx", "--no-progress"], capsys)
    assert code in (0, None), err
    assert not (tmp_path / "eng" / CHAIN_MANIFEST).exists()
    assert (tmp_path / "eng" / "engine.sm89.plan").is_file()


def test_plan_estimates_the_build_host_memory_one_engine_and_per_layer():
    from types import SimpleNamespace

    from moec.compiler.plan import BUILD_RSS_BASE, build_host_estimate

    cfg = SimpleNamespace(vocab_size=10, hidden_size=4, num_hidden_layers=2)
    # Embedding and lm_head 10 x 4 x 2 bytes each; the 840 other bytes are 420 a layer, + one edge.
    assert build_host_estimate(cfg, 1000) == {"one_engine": 1800 + BUILD_RSS_BASE, "layers_per_engine_1": 900 + BUILD_RSS_BASE}


@pytest.mark.trt
def test_the_chain_holds_one_tokenizer_in_its_own_folder(chain_dir, capsys):
    from moec.compiler.build.chain import inspect_layer_chain
    from moec.compiler.commands.run import artifact_sidecar, find_tokenizer

    chain, _ = load_layer_chain(chain_dir)
    tok = chain_dir / contract.TOKENIZER_FILE
    assert chain["tokenizer"] == contract.TOKENIZER_FILE and tok.is_file()
    for r in chain["ranges"]:
        assert not (chain_dir / r["dir"] / contract.TOKENIZER_FILE).exists()
        assert json.loads((chain_dir / r["dir"] / contract.ENGINE_MANIFEST).read_text())["tokenizer"] is None
    assert chain_tokenizer(chain_dir, chain) == tok
    assert inspect_layer_chain(chain_dir)["tokenizer"] == str(tok)
    # `moec run CHAIN --prompt` takes it from there, checked against the chain's sidecar.
    assert find_tokenizer(chain_dir, None) == tok
    assert artifact_sidecar(chain_dir)["tokenizer_sha256"]


def test_a_chain_whose_tokenizer_is_gone_is_named(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(MoecError, match="tokenizer.json is missing"):
        chain_tokenizer(tmp_path / "x", {"tokenizer": contract.TOKENIZER_FILE})
    with pytest.raises(MoecError, match="not a plain file name"):
        chain_tokenizer(tmp_path / "x", {"tokenizer": "../tokenizer.json"})
    assert chain_tokenizer(tmp_path / "x", {"tokenizer": None}) is None


@pytest.mark.trt
def test_run_on_a_chain_without_a_gpu_is_one_named_line(chain_dir, capsys):
    code, out, err = run_cli(["run", chain_dir, "--prompt-ids", "1 2 3", "--max-new-tokens", "2"], capsys)
    assert code == 2 and "no CUDA GPU" in err and "Traceback" not in err
