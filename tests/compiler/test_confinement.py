"""No file outside a model's or an engine's folder is ever read, hashed, copied or shipped
(issue 11, "confinement"): external-data locations, side files (sidecar, tokenizer) and every path
in a manifest go through moec.common.confine in each reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from moec.common import contract
from moec.common.confine import confined_path, plain_file_name
from moec.common.errors import MoecError

trt = pytest.importorskip("tensorrt_rtx")

from test_build import quiet, write_moec_graph  # noqa: E402

from moec.compiler.build import build_engine, inspect_engine_dir  # noqa: E402

SECRET = b"host secret, never to be embedded" * 8


def _external(src: Path) -> Path:
    """Rewrite ``src`` with every initializer in model.onnx.data; return the data file."""
    onnx.save_model(onnx.load(src), src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return src.with_name("model.onnx.data")


def _point_external_data_at(src: Path, location: str) -> None:
    model = onnx.load(src, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(model, src)


@pytest.fixture
def outside(tmp_path) -> Path:
    secret = tmp_path / "elsewhere" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    return secret


@pytest.fixture
def symlinked(tmp_path, outside) -> Path:
    """A moec graph whose external data is a symlink to a file outside the model's folder, of the
    right size (so only confinement can refuse it)."""
    src = write_moec_graph(tmp_path / "src")
    data = _external(src)
    outside.write_bytes(data.read_bytes())  # same bytes: every size check passes
    data.unlink()
    data.symlink_to(outside)
    return src


def test_the_helper_refuses_absolute_dotdot_and_escaping_links(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "ok.bin").write_bytes(b"1")
    (tmp_path / "m" / "inner").symlink_to(tmp_path / "m" / "ok.bin")  # a link inside is fine
    assert confined_path(tmp_path / "m", "inner", "t", "fix").name == "inner"
    assert confined_path(tmp_path / "m", "sub/x.bin", "t", "fix") == tmp_path / "m" / "sub" / "x.bin"
    (tmp_path / "m" / "out").symlink_to(tmp_path)
    for bad in ("/etc/passwd", "../x", "a/../../x", "C:\\x", "\\\\host\\share\\x", "", "out/x"):
        with pytest.raises(MoecError, match="inside"):
            confined_path(tmp_path / "m", bad, "tensor 'w''s external data", "re-export")
    for bad in ("sub/x.bin", "..", ".", None, 3):
        with pytest.raises(MoecError):
            plain_file_name(tmp_path / "m", bad, "engines[0].file", "rebuild")


@pytest.mark.parametrize("how", ["symlink", "absolute", "dotdot"])
def test_build_refuses_external_data_outside_the_folder(tmp_path, outside, symlinked, how):
    if how != "symlink":
        symlinked.with_name("model.onnx.data").unlink()
        _point_external_data_at(symlinked, str(outside) if how == "absolute" else "../elsewhere/secret.bin")
    with pytest.raises(MoecError, match="outside|not a relative path inside"):
        build_engine(symlinked, tmp_path / "e", quiet())
    assert not (tmp_path / "e").exists()


def test_optimize_run_and_bench_refuse_external_data_outside_the_folder(tmp_path, symlinked):
    from moec.compiler.pipeline import optimize_onnx
    from moec.runtime.bench import source_hashes
    from moec.runtime.ort_backend import OrtBackend

    with pytest.raises(MoecError, match="resolves to .*secret.bin outside"):
        optimize_onnx(symlinked, tmp_path / "opt" / "m.onnx")
    assert not (tmp_path / "opt").exists()
    with pytest.raises(MoecError, match="outside"):
        OrtBackend.from_onnx(symlinked)
    with pytest.raises(MoecError, match="outside"):
        source_hashes(symlinked)  # what bench and build hash


def test_a_tokenizer_or_sidecar_linked_from_elsewhere_is_not_read_or_shipped(tmp_path, outside):
    from moec.compiler.pipeline import optimize_onnx

    src = write_moec_graph(tmp_path / "src")
    tok = src.parent / contract.TOKENIZER_FILE
    tok.unlink()
    tok.symlink_to(outside)
    with pytest.raises(MoecError, match="tokenizer of .* outside"):
        build_engine(src, tmp_path / "e", quiet())
    with pytest.raises(MoecError, match="tokenizer of .* outside"):
        optimize_onnx(src, tmp_path / "o" / "m.onnx")
    tok.unlink()
    side = contract.sidecar_path(src)
    outside.write_text(side.read_text())
    side.unlink()
    side.symlink_to(outside)
    with pytest.raises(MoecError, match="metadata of .* outside"):
        build_engine(src, tmp_path / "e", quiet())
    assert not (tmp_path / "e").exists() and not (tmp_path / "o").exists()


def test_a_tokenizer_that_does_not_match_the_recorded_digest_is_not_copied(tmp_path):
    from moec.compiler.pipeline import optimize_onnx

    src = write_moec_graph(tmp_path / "src")
    side = contract.sidecar_path(src)
    meta = json.loads(side.read_text())
    meta["tokenizer_sha256"] = "0" * 64
    side.write_text(json.dumps(meta))
    with pytest.raises(MoecError, match="not the tokenizer .* was exported with"):
        build_engine(src, tmp_path / "e", quiet())
    with pytest.raises(MoecError, match="not the tokenizer .* was exported with"):
        optimize_onnx(src, tmp_path / "o" / "m.onnx")


@pytest.fixture
def engine_dir(tmp_path) -> Path:
    out = tmp_path / "e"
    build_engine(write_moec_graph(tmp_path / "src"), out, quiet())
    return out


def _edit_manifest(engine_dir: Path, edit) -> None:
    path = engine_dir / contract.ENGINE_MANIFEST
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("name", ["../../x.engine", "/etc/passwd", "sub/engine.plan", "..", "link.plan"])
def test_every_manifest_path_is_a_plain_file_in_the_engine_folder(engine_dir, tmp_path, outside, name):
    from moec.runtime.trt_backend import TrtBackend

    (engine_dir / "link.plan").symlink_to(outside)
    for key in ("file", "sidecar", "tokenizer"):
        def edit(m, key=key):
            if key == "file":
                m["engines"][0]["file"] = name
            else:
                m[key] = name
        shutil_copy = (engine_dir / contract.ENGINE_MANIFEST).read_text()
        _edit_manifest(engine_dir, edit)
        with pytest.raises(MoecError, match="plain file name|outside|not a relative path"):
            inspect_engine_dir(engine_dir)
        with pytest.raises(MoecError, match="plain file name|outside|not a relative path"):
            TrtBackend.from_engine_dir(engine_dir)
        (engine_dir / contract.ENGINE_MANIFEST).write_text(shutil_copy)


def test_an_empty_engine_list_or_a_zero_byte_engine_is_not_an_engine_folder(engine_dir):
    from moec.runtime.trt_backend import TrtBackend

    original = (engine_dir / contract.ENGINE_MANIFEST).read_text()
    _edit_manifest(engine_dir, lambda m: m.update(engines=[]))
    with pytest.raises(MoecError, match="lists no engine"):
        inspect_engine_dir(engine_dir)
    (engine_dir / contract.ENGINE_MANIFEST).write_text(original)
    plan = next(engine_dir.glob("*.plan"))
    plan.write_bytes(b"")
    report = inspect_engine_dir(engine_dir)
    assert any("empty (0 bytes)" in p for p in report["problems"])
    with pytest.raises(MoecError, match="empty"):
        TrtBackend.from_engine_dir(engine_dir)
    assert os.path.getsize(plan) == 0


# Hard links: no path says where a hard link's other names are, so a regular file with more than
# one name is refused wherever confinement applies (moec.common.confine); a copy is accepted.
@pytest.fixture
def hardlinked(tmp_path, outside) -> Path:
    """A moec graph whose external data is a hard link to a file outside the model's folder."""
    src = write_moec_graph(tmp_path / "src")
    data = _external(src)
    outside.write_bytes(data.read_bytes())
    data.unlink()
    os.link(outside, data)
    return src


def test_the_helper_refuses_a_hard_link_and_accepts_a_copy(tmp_path, outside):
    (tmp_path / "m").mkdir()
    os.link(outside, tmp_path / "m" / "w.bin")
    with pytest.raises(MoecError, match=r"'w.bin', which is a hard link \(2 names for one file\)"):
        confined_path(tmp_path / "m", "w.bin", "tensor 'w''s external data", "re-export")
    with pytest.raises(MoecError, match="hard link"):
        plain_file_name(tmp_path / "m", "w.bin", "engines[0].file", "rebuild")
    (tmp_path / "m" / "w.bin").unlink()
    (tmp_path / "m" / "w.bin").write_bytes(outside.read_bytes())  # a copy: one name
    assert confined_path(tmp_path / "m", "w.bin", "t", "fix") == tmp_path / "m" / "w.bin"
    assert confined_path(tmp_path / "m", "absent.bin", "t", "fix").name == "absent.bin"  # the caller says it is missing


def test_every_reader_refuses_external_data_that_is_a_hard_link(tmp_path, hardlinked):
    from moec.compiler.pipeline import optimize_onnx
    from moec.runtime.bench import source_hashes
    from moec.runtime.ort_backend import OrtBackend

    with pytest.raises(MoecError, match="external data names 'model.onnx.data', which is a hard link"):
        build_engine(hardlinked, tmp_path / "e", quiet())
    with pytest.raises(MoecError, match="hard link"):
        optimize_onnx(hardlinked, tmp_path / "opt" / "m.onnx")
    with pytest.raises(MoecError, match="hard link"):
        OrtBackend.from_onnx(hardlinked)
    with pytest.raises(MoecError, match="hard link"):
        source_hashes(hardlinked)
    assert not (tmp_path / "e").exists() and not (tmp_path / "opt").exists()


def test_a_hard_linked_tokenizer_sidecar_or_engine_is_not_read_or_shipped(tmp_path, outside):
    from moec.compiler.pipeline import optimize_onnx
    from moec.runtime.trt_backend import TrtBackend

    src = write_moec_graph(tmp_path / "src")
    tok = src.parent / contract.TOKENIZER_FILE
    outside.write_bytes(tok.read_bytes())
    tok.unlink()
    os.link(outside, tok)
    with pytest.raises(MoecError, match="tokenizer of .* hard link"):
        build_engine(src, tmp_path / "e", quiet())
    with pytest.raises(MoecError, match="tokenizer of .* hard link"):
        optimize_onnx(src, tmp_path / "o" / "m.onnx")
    tok.unlink()
    side = contract.sidecar_path(src)
    other = tmp_path / "elsewhere" / "side.json"
    os.link(side, other)
    with pytest.raises(MoecError, match="metadata of .* hard link"):
        build_engine(src, tmp_path / "e", quiet())
    other.unlink()
    out = tmp_path / "e"
    build_engine(src, out, quiet())  # a single name again: builds
    plan = next(out.glob("*.plan"))
    os.link(plan, tmp_path / "elsewhere" / "e.plan")
    with pytest.raises(MoecError, match=r"engines\[0\]\.file names .* hard link"):
        inspect_engine_dir(out)
    with pytest.raises(MoecError, match="hard link"):
        TrtBackend.from_engine_dir(out)


@pytest.mark.parametrize("link", ["symlinked", "hardlinked"])
def test_partition_refuses_external_data_from_outside(tmp_path, link, request):
    from moec.compiler.partition import ParallelConfig, optimize_partitioned
    from moec.compiler.pipeline import OptimizeConfig

    src = request.getfixturevalue(link)
    side = contract.sidecar_path(src)
    meta = json.loads(side.read_text())
    with pytest.raises(MoecError, match="model_config lacks or mistypes a size the split needs"):
        optimize_partitioned(src, tmp_path / "parts", OptimizeConfig(), ParallelConfig(tp=2, ep=1))
    meta["model_config"] = {"num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2,
                            "intermediate_size_mlp": 8, "moe_layers": []}  # sizes tp 2 divides
    side.write_text(json.dumps(meta))
    with pytest.raises(MoecError, match="outside|hard link"):
        optimize_partitioned(src, tmp_path / "parts", OptimizeConfig(), ParallelConfig(tp=2, ep=1))
    assert not (tmp_path / "parts").exists()


def test_a_timing_cache_that_is_a_symbolic_link_is_refused_not_written_through(tmp_path, outside):
    import dataclasses

    src = write_moec_graph(tmp_path / "src")
    link = tmp_path / "cache.bin"
    link.symlink_to(outside)
    with pytest.raises(MoecError, match="--timing-cache .* is a symbolic link"):
        build_engine(src, tmp_path / "e", dataclasses.replace(quiet(), timing_cache=link))
    assert outside.read_bytes() == SECRET and not (tmp_path / "e").exists()
