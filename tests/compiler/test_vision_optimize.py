"""The vision graph through the optimize stage (compiler/vision_optimize.py): the same numbers on ONNX Runtime
(fp32 tight; fp16 against the fp32 export), the precision pass fires and the text fusions that must not match
the vision tower (RMSNorm, rotary, attention) do not, and refusals are named errors before anything is written."""

import collections
import json

import numpy as np
import onnx
import pytest
from moec_cli import run_cli

from moec.compiler.export_vision import export_vision_onnx
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.models.demo import write_demo_checkpoint
from moec.runtime.vision import PIXELS

TILES = 5  # one 2 x 2 image and its global tile


@pytest.fixture(scope="module")
def vision_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("vopt")
    ckpt = write_demo_checkpoint(root / "ckpt", layout="conditional_generation", vision=True)
    return export_vision_onnx(ckpt, root / "export" / "model.vision.onnx")


def _features(onnx_path, pixels):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # ORT's own fusions off: the comparison is of moec's passes, not of ORT's rewrites of either graph.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {PIXELS: pixels})[0]


def _pixels():
    # Normalized tiles as the processor makes them: (x - 0.5) / 0.5 of [0, 1] pixels.
    return np.random.default_rng(0).uniform(-1, 1, (TILES, 3, 56, 56)).astype(np.float32)


def _op_counts(path):
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


@pytest.mark.parametrize("target", ["ort", "trt-rtx:sm89"])
def test_fp32_vision_graph_optimizes_to_the_same_numbers(vision_export, tmp_path, target):
    out = tmp_path / "model.opt.vision.onnx"
    report = optimize_onnx(vision_export, out, OptimizeConfig(target=target))
    passes = {r.name: r.matches for r in report.passes}
    # What must not fire on the vision tower: its norms are LayerNorm, its rotary is 2D over patch rows and
    # columns, its attention is unmasked and bidirectional; and the MoE fusions are not in its pipeline.
    assert passes["fuse_rms_norm"] == 0 and passes["fuse_rotary"] == 0
    assert ("fuse_attention" in passes) == (target == "ort") and passes.get("fuse_attention", 0) == 0
    assert not {"fuse_moe_gating", "fuse_grouped_experts", "lower_moe"} & set(passes)
    before, after = _op_counts(vision_export), _op_counts(out)
    assert not {"RMSNormalization", "RotaryEmbedding", "Attention"} & set(after)
    assert after["LayerNormalization"] == before["LayerNormalization"] > 0
    pixels = _pixels()
    np.testing.assert_allclose(_features(out, pixels), _features(vision_export, pixels), rtol=1e-6, atol=1e-6)
    meta = json.loads(out.with_name("model.opt.vision.moec.json").read_text())
    assert meta["format"] == "moec-vision" and meta["target"] == target and meta["precision"] == "fp32"


def test_fp16_vision_graph_matches_the_fp32_export_within_fp16_rounding(vision_export, tmp_path):
    out = tmp_path / "model.opt.vision.onnx"
    report = optimize_onnx(vision_export, out, OptimizeConfig(target="ort", precision="fp16"))
    assert {r.name: r.matches for r in report.passes}["convert_to_fp16"] > 0  # the precision pass fires
    graph = onnx.load(out).graph
    # Weights are fp16; the I/O contract (fp32 pixels in, fp32 features out) is kept with casts at the boundary.
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    weights = [i for i in graph.initializer if i.data_type in floats and np.prod(i.dims) > 1]
    assert weights and {i.data_type for i in weights} == {onnx.TensorProto.FLOAT16}
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [onnx.TensorProto.FLOAT] * 2
    pixels = _pixels()
    ref, got = _features(vision_export, pixels), _features(out, pixels)
    # fp16 rounds every weight and activation to 11 significant bits (unit roundoff u = 2**-11 = 4.9e-4). The
    # tower is about 20 roundings deep (patch embedding, 2 x (LayerNorm, q/k/v, softmax, output, LayerNorm, MLP
    # up and down), the adapter MLP, the projector); LayerNorm renormalizes, so errors add rather than grow:
    # a norm-wise relative error of 20 u (1e-2) bounds it, and a wrong graph (a dropped cast, fp16 overflow,
    # a skipped layer) is off by O(1).
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 20 * 2.0**-11, rel
    assert np.isfinite(got).all()
    meta = json.loads(out.with_name("model.opt.vision.moec.json").read_text())
    assert meta["precision"] == "fp16" and meta["dtype"] == "fp32"  # dtype: the graph's I/O, as the runtime feeds it


def test_vision_graph_refusals_are_named_before_writing(vision_export, tmp_path, capsys):
    cases = [
        (["-o", tmp_path / "a" / "x.onnx"], "name the optimized vision graph NAME.vision.onnx"),
        (["-o", tmp_path / "b" / "x.vision.onnx", "--quantize", "int8"], "--quantize applies to the text graph"),
        (["-o", tmp_path / "c" / "x.vision.onnx", "--require-fusion"], "--require-fusion applies to the text graph"),
        (["-o", tmp_path / "d" / "x.vision.onnx", "--dump-dir", tmp_path / "e"],
         "--dump-dir applies to the text graph"),
    ]
    for args, message in cases:
        code, _, err = run_cli(["optimize", vision_export, *args], capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())
    done = tmp_path / "done" / "m.vision.onnx"
    optimize_onnx(vision_export, done, OptimizeConfig(target="trt-rtx:sm89", precision="fp16"))
    code, _, err = run_cli(["optimize", done, "-o", tmp_path / "again" / "m.vision.onnx", "--target", "ort"], capsys)
    assert code == 2 and "already optimized for trt-rtx:sm89" in err and not (tmp_path / "again").exists()
    code, _, err = run_cli(["optimize", done, "-o", tmp_path / "twice" / "m.vision.onnx", "--target", "trt-rtx:sm89",
                            "--precision", "fp16"], capsys)
    assert code == 0, err  # for its own target again: a no-op rerun, not a second conversion
    meta = json.loads((tmp_path / "twice" / "m.vision.moec.json").read_text())
    assert meta["precision"] == "fp16"
