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

    def get(symmetric: bool = True) -> Path:
        if symmetric not in cache:
            out = root / f"sym_{symmetric}" / "model.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimize_onnx(odd_onnx, out, OptimizeConfig(target="ort", quantize="int4", quantize_group=32,
                                                            quantize_scope="all", quantize_symmetric=symmetric))
            cache[symmetric] = out
        return cache[symmetric]

    return get


def numpy_dequantized(export: Path, symmetric: bool) -> dict[str, np.ndarray]:
    """The export's in-scope weights quantized and dequantized by NumPy alone (the format's own
    functions), independent of the graph the pass and the lowerings wrote."""
    from moec.passes.quantize import dequantize, make_spec
    from moec.passes.quantize.apply import find_weights

    spec = make_spec("int4", 32, "all", symmetric)
    model = ir.load(export)
    # The unfused export's experts feed a batched MatMul, which the pass does not take before fusion.
    sites = {s.value.name: (s.value, s.axis) for s in find_weights(model, spec)}
    sites.update({name: (v, 1) for name, v in model.graph.initializers.items()
                  if name.endswith(("experts.gate_up_proj", "experts.down_proj"))})
    return {name: dequantize(spec.fmt.quantize(v.const_value.numpy(), axis, 32, symmetric))
            for name, (v, axis) in sites.items()}


def test_fires_with_a_shorter_last_block(optimized):
    model = ir.load(optimized())
    ops = Counter(n.op_type for n in model.graph)
    # 28 dense weights + 2 MoE layers x 4 experts x 2 (the split lowering: MatMulNBits per expert).
    assert ops["QMoE"] == 0 and ops["MatMulNBits"] == 28 + 16 and ops["DequantizeLinear"] == 0
    expert_down = next(n for n in model.graph if n.op_type == "MatMulNBits" and ".split0_nbits" in n.inputs[1].name
                       and "down" in n.inputs[1].name)
    assert expert_down.attributes["K"].value == 48 and list(expert_down.inputs[1].shape) == [96, 2, 16]  # ceil(48 / 32)
    dense_down = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes["K"].value == 80)
    assert list(dense_down.inputs[1].shape) == [96, 3, 16]  # 80 = 32 + 32 + 16, the last block padded


@pytest.mark.parametrize("symmetric", [True, False])
def test_same_numbers_as_the_numpy_dequantized_export(odd_onnx, optimized, symmetric):
    weights = numpy_dequantized(odd_onnx, symmetric)
    assert len(weights) == 2 * 2 + 4 * 4 + 4 * 3  # experts, attention, dense MLPs and shared experts
    reference = reference_model(odd_onnx, None, weights)
    for past, new in [(0, 6), (5, 1)]:
        feeds = demo_feeds(odd_onnx, past, new)
        want = ort_run(reference, feeds)
        for g, w in zip(ort_run(optimized(symmetric), feeds), want):
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


def test_tensorrt_refuses_a_shorter_last_block_by_name(odd_onnx, tmp_path):
    # TensorRT-RTX 1.7's parser: "The quantization axis must divide into whole blocks".
    with pytest.raises(MoecError, match=r"--quantize-group 32 does not divide \S+down_proj's reduction dimension 48, "
                                        r"and TensorRT's DequantizeLinear takes whole blocks only: no group of 32, 64, "
                                        r"128 divides every K of the scope \(48, 96\): target ort"):
        optimize_onnx(odd_onnx, tmp_path / "out.onnx", OptimizeConfig(target="trt-rtx:sm89", quantize="int4",
                                                                      quantize_group=32))
    assert not (tmp_path / "out.onnx").exists()


def test_compile_names_the_tensorrt_refusal_before_exporting():
    from moec.compiler.quantize_stage import check_model_fits
    from moec.models.config import Llama4Config
    from moec.passes.quantize import make_spec

    smollm_like = Llama4Config.preset("llama4-tiny").replace(hidden_size=576, intermediate_size=1536,
                                                             intermediate_size_mlp=1536, head_dim=144)
    check_model_fits(make_spec("int4", 128), smollm_like, "config.json")  # ort: 576 = 4 x 128 + 64
    with pytest.raises(MoecError, match=r"config.json: --quantize-group 128 does not divide experts.gate_up_proj's "
                                        r"reduction dimension 576.*use --quantize-group 64"):
        check_model_fits(make_spec("int4", 128), smollm_like, "config.json", whole_blocks=True)
