"""int4 groups that do not divide a reduction dimension (SmolLM2's hidden size 576 in groups of
128): the last block is shorter, as ONNX DequantizeLinear defines it. Fires (the shorter block's
scales are there, QMoE and MatMulNBits take it), same numbers (ONNX Runtime on the quantized graph
equals the export with NumPy-dequantized weights), and a group longer than a K is still named."""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from moec.common.errors import MoecError
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

sys.path.insert(0, str(Path(__file__).parent))
from conftest import demo_feeds, ort_run, rel_err  # noqa: E402
from quant_reference import reference_model  # noqa: E402

# K = 96 (hidden: three blocks of 32), 48 (experts' down: 32 + 16), 80 (dense down: 32 + 32 + 16).
SIZES = dict(hidden_size=96, intermediate_size=48, intermediate_size_mlp=80, head_dim=24)


@pytest.fixture(scope="module")
def odd_onnx(tmp_path_factory):
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.models.config import Llama4Config
    from moec.models.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("odd_k")
    config = Llama4Config.preset("llama4-tiny").replace(**SIZES)
    ckpt = write_demo_checkpoint(root / "ckpt", preset=config, seed=1)
    out = root / "onnx" / "model.onnx"
    export_onnx(ckpt, out, ExportConfig(dtype="fp32"))
    return out


@pytest.fixture(scope="module")
def optimized(odd_onnx, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("odd_k_q"), {}

    def get(target: str, symmetric: bool = True) -> Path:
        if (target, symmetric) not in cache:
            out = root / f"{target.replace(':', '_')}_{symmetric}" / "model.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimize_onnx(odd_onnx, out, OptimizeConfig(target=target, quantize="int4", quantize_group=32,
                                                            quantize_scope="all", quantize_symmetric=symmetric))
            cache[target, symmetric] = out
        return cache[target, symmetric]

    return get


def test_fires_with_a_shorter_last_block(optimized):
    model = ir.load(optimized("ort"))
    ops = Counter(n.op_type for n in model.graph)
    assert ops["QMoE"] == 2 and ops["MatMulNBits"] == 28 and ops["DequantizeLinear"] == 0
    qmoe = next(n for n in model.graph if n.op_type == "QMoE")
    assert list(qmoe.inputs[3].shape) == [4, 96, 3] and list(qmoe.inputs[6].shape) == [4, 96, 2]  # ceil(48 / 32)
    dense_down = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes["K"].value == 80)
    assert list(dense_down.inputs[1].shape) == [96, 3, 16]  # 80 = 32 + 32 + 16, the last block padded
    trt = ir.load(optimized("trt-rtx:sm89"))
    down = trt.graph.initializers["model.layers.1.feed_forward.experts.down_proj.int4-g32.scale"]
    assert list(down.shape) == [4, 2, 96]


@pytest.mark.parametrize("target,symmetric", [("ort", True), ("ort", False), ("trt-rtx:sm89", True)])
def test_same_numbers_as_the_dequantized_reference(odd_onnx, optimized, target, symmetric):
    graph = optimized(target, symmetric)
    reference = reference_model(odd_onnx, ir.load(optimized("trt-rtx:sm89", symmetric) if target == "ort" else graph))
    for past, new in [(0, 6), (5, 1)]:
        feeds = demo_feeds(odd_onnx, past, new)
        want = ort_run(reference, feeds)
        for g, w in zip(ort_run(graph, feeds), want):
            assert rel_err(g, w) < 1e-5, rel_err(g, w)
    # The check can fail: int4 moves the logits well beyond that.
    assert rel_err(ort_run(odd_onnx, feeds)[0], want[0]) > 1e-3


def test_shorter_block_error_is_what_the_format_allows():
    from moec.passes.quantize import FORMATS, dequantize

    rng = np.random.default_rng(0)
    w = (rng.standard_t(5, (48, 20)) * 0.02).astype(np.float32)
    for symmetric in (True, False):
        qt = FORMATS["int4"].quantize(w, 0, 32, symmetric)
        assert qt.q.shape == w.shape and qt.scale.shape == (2, 20)
        # The 16-row last block has its own scale: that of those rows alone.
        if symmetric:
            assert np.allclose(qt.scale[1], np.abs(w[32:]).max(0) / 7)
        err = np.abs(dequantize(qt) - w)
        assert np.all(err <= FORMATS["int4"].error_bound(w, qt) * (1 + 1e-6) + 1e-9)


def test_group_longer_than_a_k_is_named(odd_onnx, tmp_path):
    with pytest.raises(MoecError, match=r"--quantize-group 64 is longer than model\.layers\.\d\.feed_forward\.experts"):
        optimize_onnx(odd_onnx, tmp_path / "out.onnx", OptimizeConfig(quantize="int4", quantize_group=64))
    assert not (tmp_path / "out.onnx").exists()
