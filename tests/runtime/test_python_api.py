"""The obvious Python calls work: moec.__version__, a backend built from a path, and the demo's
random weights said where its output is printed."""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import numpy as np
import pytest

from moec.common.errors import MoecError
from moec_cli import run_cli


def test_version_is_the_installed_one():
    import moec

    assert moec.__version__ == importlib.metadata.version("moec")


def test_backends_take_a_path(demo_ckpt, demo_onnx, tmp_path):
    from moec.models.torch_backend import TorchBackend
    from moec.runtime.ort_backend import OrtBackend
    from moec.runtime.trt_backend import TrtBackend

    ids = np.array([[1, 2, 3]], dtype=np.int64)
    pos = np.arange(3, dtype=np.int64)[None]
    by_path = OrtBackend(demo_onnx, graph_optimization=False)
    classic = OrtBackend.from_onnx(demo_onnx, graph_optimization=False)
    assert by_path.num_layers == classic.num_layers and by_path.path == classic.path
    logits, _ = by_path.forward(ids, pos, by_path.init_cache(1))
    expect, _ = classic.forward(ids, pos, classic.init_cache(1))
    np.testing.assert_array_equal(logits, expect)
    torch_backend = TorchBackend(demo_ckpt, dtype="fp32")
    assert torch_backend.max_positions == classic.max_positions
    with pytest.raises(MoecError):  # from_engine_dir's own refusal, not a TypeError
        TrtBackend(tmp_path / "no-engine")


def test_the_demo_says_its_output_is_noise(demo_ckpt, demo_onnx, tmp_path, capsys):
    from moec.common.demo_note import DEMO_MARKER, NOTE

    assert json.loads((demo_onnx.parent / "model.moec.json").read_text())["random_weights"] is True
    for artifact in (demo_onnx, demo_ckpt):
        code, out, err = run_cli(["run", artifact, "--prompt-ids", "1 2", "--max-new-tokens", 1], capsys)
        assert code == 0 and NOTE in err, (artifact, err)
    code, out, _ = run_cli(["run", demo_onnx, "--prompt-ids", "1 2", "--max-new-tokens", 1, "--json"], capsys)
    assert json.loads(out)["random_weights"] is True
    # Must not fire: the same weights without the demo's marker are some other checkpoint.
    real = tmp_path / "ckpt"
    shutil.copytree(demo_ckpt, real)
    (real / DEMO_MARKER).unlink()
    code, _, err = run_cli(["run", real, "--prompt-ids", "1 2", "--max-new-tokens", 1], capsys)
    assert code == 0 and NOTE not in err
