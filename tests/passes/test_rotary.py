"""fuse_rotary on the demo export: fires, must not fire, same numbers; TensorRT-RTX builds it."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from conftest import demo_feeds, ort_run, rel_err

from moec.passes.fusions._graph import FusionLog
from moec.passes.fusions.rotary import fuse_rotary

# llama4-tiny: layers 0-2 use RoPE (layer 3 is NoPE), each on q (4 heads) and k (2 kv heads).
ROPE_APPLICATIONS = 6


def fused(path) -> tuple[ir.Model, int, FusionLog]:
    model, log = ir.load(path), FusionLog()
    return model, fuse_rotary(model, log), log


def test_rotary_fires_on_every_rope_application(demo_clean):
    model, n, log = fused(demo_clean)
    assert n == ROPE_APPLICATIONS, log.refusals
    ropes = [node for node in model.graph if node.op_type == "RotaryEmbedding"]
    assert len(ropes) == ROPE_APPLICATIONS
    assert all(r.attributes.get_int("interleaved") == 1 for r in ropes)
    assert sorted(r.attributes.get_int("num_heads") for r in ropes) == [2, 2, 2, 4, 4, 4]
    assert model.opset_imports[""] == 23
    # The pair view and its Gathers are gone; the embedding Gather stays, and so do the ring caches'
    # updates (outputs present_*) and the reads of the step's first position that index them.
    outputs = {v.name for v in model.graph.outputs}
    pair_gathers = [n for n in model.graph if n.op_type == "Gather" and n.outputs[0].name not in outputs
                    and not _reads_positions(n)]
    assert len(pair_gathers) == 1


def _reads_positions(node) -> bool:
    """A Gather on position_ids (directly or through one Slice/Squeeze), as the ring index does."""
    src = node.inputs[0]
    for _ in range(3):
        if src is None:
            return False
        if src.name == "position_ids":
            return True
        producer = src.producer()
        src = producer.inputs[0] if producer is not None and producer.inputs else None
    return False


def test_rotary_refuses_a_second_consumer(demo_clean):
    model = ir.load(demo_clean)
    stack = next(node for node in model.graph if node.op_type == "Concat" and node.outputs[0].name == "stack")
    model.graph.outputs.append(stack.outputs[0])
    assert fuse_rotary(model) == ROPE_APPLICATIONS - 1


@pytest.mark.parametrize("change,reason", [
    (lambda cos: setattr(cos, "dtype", ir.DataType.FLOAT16), "cos cache is FLOAT16"),
    (lambda cos: setattr(cos, "shape", ir.Shape([1, cos.shape[1], 8])), "is not [B, S, D/2]"),
])
def test_rotary_refuses_a_cache_of_another_dtype_or_shape(demo_clean, change, reason):
    model = ir.load(demo_clean)
    change(next(node for node in model.graph if node.op_type == "Cos").outputs[0])
    log = FusionLog()
    assert fuse_rotary(model, log) == 0
    assert log.refusals and all(reason in r.reason for r in log.refusals), log.refusals


@pytest.mark.parametrize("past,new", [(3, 11), (12, 1)])  # prefill across a chunk boundary; decode
def test_rotary_keeps_numbers(demo_clean, past, new):
    model, n, _ = fused(demo_clean)
    assert n == ROPE_APPLICATIONS
    feeds = demo_feeds(demo_clean, past, new)
    before, after = ort_run(demo_clean, feeds), ort_run(model, feeds)
    assert max(rel_err(a, b) for a, b in zip(after, before)) <= 1e-5


@pytest.mark.trt
def test_tensorrt_rtx_builds_the_fused_demo_for_sm89(demo_onnx, tmp_path):
    trt = pytest.importorskip("tensorrt_rtx")
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    out = tmp_path / "rtx" / "model.onnx"
    report = optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt-rtx:sm89"))
    assert {r.name: r.matches for r in report.passes}["fuse_rotary"] == ROPE_APPLICATIONS
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(out)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    layers = [network.get_layer(i).type for i in range(network.num_layers)]
    assert layers.count(trt.LayerType.ROTARY_EMBEDDING) == ROPE_APPLICATIONS
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM89, 0)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        # A full cache may start empty; a chunked layer's ring (slot axis fixed) is always full size.
        low = [0 if t.name.startswith("past") and j == 2 and d == -1 else 1 if d == -1 else d for j, d in enumerate(t.shape)]
        high = [16 if d == -1 else d for d in t.shape]
        profile.set_shape(t.name, low, low, high)
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None
