"""Bad input or a full disk ends in one `error:` line and exit 2, never a traceback, and leaves no
partial artifact (issue 11, "no traceback, ever")."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from moec.common import contract
from moec_cli import run_cli

trt = pytest.importorskip("tensorrt_rtx")

from test_build import write_moec_graph  # noqa: E402


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "no space left")


def one_error_line(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n.lower() in err.lower(), err


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from moec.compiler.build import BuildConfig, build_engine

    root = tmp_path_factory.mktemp("engine")
    out = root / "e"
    build_engine(write_moec_graph(root / "src"), out, BuildConfig(progress=False))
    return out


@pytest.mark.parametrize("content, needle", [
    (b"[1, 2, 3]", "not a JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    (None, "lacks io"),  # a key removed
    ("engines", "engines must be a list"),  # a wrong type
    ("profiles", "profiles must be a non-empty list"),
])
def test_a_damaged_manifest_is_named_by_inspect_run_and_bench(engine, tmp_path, capsys, content, needle):
    eng = tmp_path / "e"
    shutil.copytree(engine, eng)
    manifest = eng / contract.ENGINE_MANIFEST
    if isinstance(content, bytes):
        manifest.write_bytes(content)
    else:
        m = json.loads(manifest.read_text())
        if content is None:
            del m["io"]
        else:
            m[content] = "oops"
        manifest.write_text(json.dumps(m))
    for args in (["inspect", eng], ["run", eng, "--prompt-ids", "1 2"], ["bench", eng]):
        one_error_line(*run_cli(args, capsys)[::2], needle)


def test_a_prompt_that_is_not_utf8_is_named(demo_onnx, capsys):
    prompt = b"\xff\xfehello".decode("utf-8", "surrogateescape")  # what the shell hands Python
    one_error_line(*run_cli(["run", demo_onnx, "--prompt", prompt], capsys)[::2], "--prompt is not valid UTF-8")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_empty_or_truncated_onnx_is_named_by_build_bench_and_optimize(tmp_path, capsys, damage):
    src = write_moec_graph(tmp_path / "src")
    data = src.read_bytes()
    src.write_bytes(b"" if damage == "empty" else data[: len(data) // 3])
    needle = "empty (0 bytes)" if damage == "empty" else "not a readable ONNX model"
    one_error_line(*run_cli(["build", src, "-o", tmp_path / "e", "--no-progress"], capsys)[::2], needle)
    one_error_line(*run_cli(["bench", src], capsys)[::2], needle)
    one_error_line(*run_cli(["optimize", src, "-o", tmp_path / "o" / "m.onnx"], capsys)[::2], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # optimize wrote no 8-byte model


def test_a_graph_that_is_not_a_moec_export_is_named_by_build(tmp_path, capsys):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src = write_moec_graph(tmp_path / "src")  # for its sidecar and tokenizer
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
                          [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    one_error_line(*run_cli(["build", src, "-o", tmp_path / "e", "--no-progress"], capsys)[::2],
                   "is not a moec export", "missing input_ids")


def test_an_output_that_is_a_symlink_is_named(tmp_path, demo_ckpt, capsys):
    src = write_moec_graph(tmp_path / "src")
    real = tmp_path / "real"
    real.mkdir()
    for name in ("e", "ckpt"):
        (tmp_path / name).symlink_to(real)
    (tmp_path / "m.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    one_error_line(*run_cli(["build", src, "-o", tmp_path / "e", "--no-progress"], capsys)[::2], "symbolic link")
    one_error_line(*run_cli(["demo-checkpoint", tmp_path / "ckpt"], capsys)[::2], "symbolic link")
    one_error_line(*run_cli(["optimize", src, "-o", tmp_path / "m.onnx"], capsys)[::2], "symbolic link")
    assert not any(real.iterdir()) and not (tmp_path / "elsewhere.onnx").exists()


def test_a_full_disk_is_named_by_every_writing_command(tmp_path, demo_onnx, monkeypatch, capsys):
    import onnx_ir
    import safetensors.torch
    import xml.etree.ElementTree as ET

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", _full_disk)
        one_error_line(*run_cli(["demo-checkpoint", tmp_path / "ck"], capsys)[::2], "no space left")
    with monkeypatch.context() as m:
        m.setattr(onnx_ir, "save", _full_disk)
        one_error_line(*run_cli(["optimize", demo_onnx, "-o", tmp_path / "o" / "m.onnx"], capsys)[::2],
                       "no space left")
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", _full_disk)
        one_error_line(*run_cli(["bench", demo_onnx, "--json-out", tmp_path / "r" / "b.json", "--repeats", "1",
                                 "--warmup", "0", "--prompt-len", "4", "--gen-len", "2"], capsys)[::2],
                       "no space left")
    from test_gate import result

    res = tmp_path / "res.json"
    res.write_text(json.dumps(result()))
    with monkeypatch.context() as m:
        m.setattr(ET.ElementTree, "write", _full_disk)
        one_error_line(*run_cli(["gate", res, "--baseline", res, "--junit", tmp_path / "j" / "g.xml"], capsys)[::2],
                       "no space left")
    with monkeypatch.context() as m:
        m.setattr(onnx_ir, "save", _full_disk)
        one_error_line(*run_cli(["compile", "-o", tmp_path / "c", "--target", "ort", "--no-verify"], capsys)[::2],
                       "export stage", "no space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json"]


def test_out_of_memory_is_a_named_error_not_a_traceback(demo_onnx, monkeypatch, capsys):
    import moec.runtime.bench as bench

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(bench, "run_bench", oom)
    one_error_line(*run_cli(["bench", demo_onnx], capsys)[::2], "moec bench: out of memory")

    def oom2(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(bench, "run_bench", oom2)
    one_error_line(*run_cli(["bench", demo_onnx], capsys)[::2], "moec bench: out of memory (MemoryError)")
    # A bug is still a bug: its traceback is kept.
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_cli(["bench", demo_onnx], capsys)
