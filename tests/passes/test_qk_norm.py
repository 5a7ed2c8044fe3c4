"""fuse_qk_norm on the demo export: fires, must not fire, same numbers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import demo_feeds, ort_run, rel_err

from moec.passes.fusions._graph import FusionLog
from moec.passes.fusions.qk_norm import fuse_qk_norm
from moec.passes.fusions.rms_norm import fuse_rms_norm

QK_NORMS = 6  # llama4-tiny: q and k of the 3 RoPE layers (the NoPE layer has none)


def _after_rms_norm(path) -> ir.Model:
    """What fuse_qk_norm meets in the pipeline: the weighted norms already RMSNormalization (before
    that, it would take their weightless inner part too: the same numbers, one Mul more)."""
    model = ir.load(path)
    assert fuse_rms_norm(model) == 9
    return model


def test_qk_norm_fires_on_q_and_k_of_every_rope_layer(demo_clean):
    model, log = _after_rms_norm(demo_clean), FusionLog()
    assert fuse_qk_norm(model, log) == QK_NORMS, log.refusals
    # The weighted norms scale by their weights (initializers), the QK norms by a constant of ones.
    norms = [n for n in model.graph if n.op_type == "RMSNormalization" and not n.inputs[1].is_initializer()]
    assert len(norms) == QK_NORMS and not [n for n in model.graph if n.op_type == "Reciprocal"]
    for n in norms:
        scale = ir.convenience.get_const_tensor(n.inputs[1]).numpy()
        assert scale.shape == (16,) and (scale == 1).all()  # head dim 16, no weight
        assert n.attributes.get_float("epsilon") == np.float32(1e-5)


def test_qk_norm_refuses_a_second_consumer(demo_clean):
    model = _after_rms_norm(demo_clean)
    model.graph.outputs.append(next(n for n in model.graph if n.op_type == "Reciprocal").outputs[0])
    assert fuse_qk_norm(model) == QK_NORMS - 1


def test_qk_norm_refuses_another_exponent(demo_clean):
    model = _after_rms_norm(demo_clean)
    pow_ = next(n for n in model.graph if n.op_type == "Pow")
    three = ir.Value(name="three", const_value=ir.tensor(np.array(3.0, np.float32)))
    model.graph.initializers["three"] = three
    pow_.replace_input_with(1, three)
    log = FusionLog()
    assert fuse_qk_norm(model, log) == QK_NORMS - 1
    assert any("not a square" in r.reason for r in log.refusals), log.refusals


def test_qk_norm_keeps_numbers(demo_clean):
    reference, model = _after_rms_norm(demo_clean), _after_rms_norm(demo_clean)
    assert fuse_qk_norm(model) == QK_NORMS
    for past, new in ((3, 11), (12, 1)):
        feeds = demo_feeds(demo_clean, past, new)
        before, after = ort_run(reference, feeds), ort_run(model, feeds)
        assert max(rel_err(a, b) for a, b in zip(after, before)) <= 1e-5
