"""fuse_attention on the demo export: fires, must not fire, same numbers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import assert_as_close_as_unfused, demo_feeds, ort_run, rel_err

from moec.passes.fusions._graph import FusionLog
from moec.passes.fusions.attention import fuse_attention
from moec.passes.fusions.rotary import fuse_rotary

LAYERS = 4  # llama4-tiny: 3 chunked RoPE layers + 1 NoPE layer, all GQA (4 heads, 2 kv heads)


def test_attention_fires_on_every_layer(demo_clean):
    model, log = ir.load(demo_clean), FusionLog()
    assert fuse_attention(model, log) == LAYERS, log.refusals
    attns = [n for n in model.graph if n.op_type == "Attention"]
    assert len(attns) == LAYERS and not [n for n in model.graph if n.op_type == "Softmax"]
    assert all(a.attributes.get_float("scale") == pytest.approx(16**-0.5) for a in attns)
    # k and v enter with their kv heads [B, 2, T, D] (the GQA repeat is gone), plus the mask.
    assert all(len(a.inputs) == 4 and a.inputs[1].shape[1] == 2 for a in attns)
    assert sum(n.op_type == "Expand" for n in model.graph) < 2 * LAYERS


def test_attention_refuses_a_second_consumer(demo_clean):
    model = ir.load(demo_clean)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    model.graph.outputs.append(softmax.outputs[0])
    assert fuse_attention(model) == LAYERS - 1


def test_attention_refuses_tiled_kv_heads(demo_clean):
    # Unsqueeze at axis 1 repeats the kv heads as a tile (k0 k1 k0 k1): not ONNX Attention's GQA order.
    model = ir.load(demo_clean)
    # Layer 0's keys (past + new): present_key.0 itself on a full cache; on a ring cache (layer 0 is
    # chunked) present_key.0 is the slots it keeps, gathered from that Concat.
    keys = model.graph.outputs[1].producer()
    keys_0 = keys.outputs[0] if keys.op_type == "Concat" else keys.inputs[0]
    assert model.graph.outputs[1].name == "present_key.0" and keys_0.producer().op_type == "Concat"
    unsq = next(n for n in model.graph if n.op_type == "Unsqueeze" and n.outputs[0].uses()
                and next(iter(n.outputs[0].uses())).node.op_type == "Expand" and n.inputs[0] is keys_0)
    unsq.replace_input_with(1, ir.Value(name="axis1", const_value=ir.tensor(np.array([1], np.int64))))
    model.graph.initializers["axis1"] = unsq.inputs[1]
    log = FusionLog()
    assert fuse_attention(model, log) == LAYERS - 1
    assert any("not repeated per kv head" in r.reason for r in log.refusals), log.refusals


def test_attention_refuses_a_mask_of_another_dtype(demo_clean):
    model = ir.load(demo_clean)
    for n in model.graph:
        if n.op_type == "Softmax":
            n.inputs[0].producer().inputs[1].dtype = ir.DataType.DOUBLE
    log = FusionLog()
    assert fuse_attention(model, log) == 0
    assert log.refusals and all("mask is DOUBLE" in r.reason for r in log.refusals), log.refusals


@pytest.mark.parametrize("past,new", [(3, 11), (12, 1)])  # prefill across a chunk boundary; decode
def test_attention_and_rotary_keep_numbers(demo_clean, past, new):
    model = ir.load(demo_clean)
    assert fuse_rotary(model) == 6 and fuse_attention(model) == LAYERS
    feeds = demo_feeds(demo_clean, past, new)
    before, after = ort_run(demo_clean, feeds), ort_run(model, feeds)
    assert max(rel_err(a, b) for a, b in zip(after, before)) <= 1e-5


@pytest.fixture(scope="module")
def demo_fp16_clean(demo_ckpt, tmp_path_factory):
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.passes import cleanup

    src = tmp_path_factory.mktemp("fp16") / "model.onnx"
    export_onnx(demo_ckpt, src, ExportConfig(dtype="fp16"))
    model = ir.load(src)
    for p in cleanup.CLEANUP_PASSES:
        p(model)
    ir.save(model, src)
    return src


def test_fp16_export_fuses_with_an_fp32_softmax_and_keeps_numbers(demo_fp16_clean, demo_clean):
    model = ir.load(demo_fp16_clean)
    assert fuse_attention(model) == LAYERS
    attns = [n for n in model.graph if n.op_type == "Attention"]
    # The export's fp32 softmax (Cast, Softmax, Cast) becomes softmax_precision=FLOAT.
    assert [a.attributes.get_int("softmax_precision") for a in attns] == [int(ir.DataType.FLOAT)] * LAYERS
    for past, new in ((3, 11), (12, 1)):
        feeds = {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in demo_feeds(demo_fp16_clean, past, new).items()}
        before, after = ort_run(demo_fp16_clean, feeds), ort_run(model, feeds)
        # Each fp16 output against the fp32 graph's, not fp16 against fp16 (tests/passes/conftest.py).
        ref = ort_run(demo_clean, demo_feeds(demo_clean, past, new))
        for a, b, r in zip(after, before, ref):
            assert_as_close_as_unfused(a, b, r)
