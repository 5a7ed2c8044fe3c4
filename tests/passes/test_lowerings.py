"""MoE lowerings: ORT-runnable ones keep the numbers; TensorRT ones have the agreed structure and
refuse (with the target and op named) what they cannot express."""

from __future__ import annotations

import importlib.util
import re

import onnx_ir as ir
import pytest
from conftest import block_input, ort_run, rel_err

from moec.common.contract import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from moec.common.errors import MoecError
from moec.passes.fusions._graph import FusionLog
from moec.passes.fusions.grouped_experts import fuse_grouped_experts
from moec.passes.fusions.moe_gating import fuse_moe_gating
from moec.passes.lowerings import lower_moe
from moec.passes.targets import lowerings_for, parse_target, unsupported_reason


def fused(path) -> ir.Model:
    model = ir.load(path)
    assert fuse_moe_gating(model) == 1 and fuse_grouped_experts(model) == 1
    return model


# (block, lowering): every pair ORT can run. The ort lowering takes Llama 4 (sigmoid, k=1, score
# on the input) and Mixtral-style softmax routing; it refuses the others (tested below).
CASES = [(b, low) for b in ("ref_k1", "ref_k2", "softmax_k2", "unrolled_in", "unrolled_out")
         for low in ("gather", "dense", "hybrid", "function")] + [("ref_k1", "ort"), ("softmax_k2", "ort"), ("unrolled_in", "ort")]


@pytest.mark.parametrize("block,lowering", CASES)
def test_ort_runnable_lowering_keeps_numbers(block_onnx, block, lowering):
    path = block_onnx(block)
    model = fused(path)
    counts = lower_moe(model, [lowering], "ort")
    assert counts == {lowering: 1}
    left = {n.op_type for n in model.graph if n.domain == "moec"}
    assert left == ({"MoEGating", "GroupedExperts"} if lowering == "function" else set())
    if lowering == "ort":
        assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["MoE"]
    feeds = block_input(seed=3, batch=3, seq=7)
    (before,), (after,) = ort_run(path, feeds), ort_run(model, feeds)
    assert rel_err(after, before) <= 1e-5


@pytest.mark.parametrize("block,why", [("ref_k2", "k=2"), ("unrolled_out", "output")])
def test_ort_lowering_refuses_what_it_cannot_express(block_onnx, block, why):
    model = fused(block_onnx(block))
    with pytest.raises(MoecError, match=r"target ort: .*GroupedExperts.*" + why):
        lower_moe(model, ["ort"], "ort")


def test_ort_default_takes_split_then_falls_back_to_hybrid(block_onnx):
    path = block_onnx("ref_k2")
    feeds = block_input()
    model = fused(path)
    assert lower_moe(model, lowerings_for(parse_target("ort"), None), "ort", by_default=True) == {"split": 1}
    assert rel_err(ort_run(model, feeds)[0], ort_run(path, feeds)[0]) <= 1e-5
    # Without split (rank graphs start at com.microsoft.MoE), sigmoid k=2 goes on to hybrid.
    model, log = fused(path), FusionLog()
    assert lower_moe(model, ["ort", "hybrid"], "ort", log, by_default=True) == {"hybrid": 1}
    assert log.refusals and "k=2" in log.refusals[0].reason
    assert rel_err(ort_run(model, feeds)[0], ort_run(path, feeds)[0]) <= 1e-5


def test_trt_native_structure_and_input_scaling(block_onnx):
    model = fused(block_onnx("ref_k1"))
    assert lower_moe(model, lowerings_for(parse_target("trt:sm100"), None), "trt:sm100") == {"trt-native": 1}
    (moe,) = [n for n in model.graph if n.op_type == "TRT_MoE"]
    assert len(moe.inputs) == 6 and moe.attributes["activation_type"].value == 1
    hidden = moe.inputs[0].producer().inputs[0]  # Unsqueeze(Mul(x, score))
    assert hidden.producer().op_type == "Mul"
    gate, up, down = (v.const_value for v in moe.inputs[3:])
    assert tuple(gate.shape) == tuple(up.shape) == (4, 16, 24) and tuple(down.shape) == (4, 24, 16)


def test_trt_native_refuses_input_scaling_with_k2(block_onnx):
    model = fused(block_onnx("ref_k2"))
    with pytest.raises(MoecError, match="trt:sm100.*k=2"):
        lower_moe(model, ["trt-native"], "trt:sm100")


@pytest.mark.parametrize("target,lowering", [("trt:sm89", "trt-native"), ("trt-rtx:sm120", "trt-native"),
                                             ("trt:sm90", "ort"), ("ort", "trt-plugin"),
                                             ("trt-rtx:sm89", "trt-plugin")])
def test_lowering_the_target_cannot_run_is_an_error(target, lowering):
    with pytest.raises(MoecError, match=f"target {target}: MoE lowering '{lowering}'"):
        lowerings_for(parse_target(target), lowering)


def test_defaults_per_target():
    assert lowerings_for(parse_target("ort"), None) == ("split", "ort", "hybrid")
    assert lowerings_for(parse_target("trt:sm100"), None)[0] == "trt-native"
    assert lowerings_for(parse_target("trt:sm90"), None) == ("hybrid",)
    assert lowerings_for(parse_target("trt:sm89"), "trt-plugin") == ("trt-plugin",)
    assert lowerings_for(parse_target("trt-rtx:sm89"), "dense") == ("dense",)
    for bad in ("tensorrt", "trt", "trt:90", "ort:sm80"):
        with pytest.raises(MoecError):
            parse_target(bad)


@pytest.mark.parametrize("block,soi", [("ref_k1", 1), ("softmax_k2", 0)])
def test_trt_plugin_node_identity(block_onnx, block, soi):
    model = fused(block_onnx(block))
    assert lower_moe(model, ["trt-plugin"], "trt:sm90") == {"trt-plugin": 1}
    (node,) = [n for n in model.graph if n.op_type == PLUGIN_NAME]
    assert node.domain == PLUGIN_NAMESPACE
    assert node.attributes["plugin_version"].value == PLUGIN_VERSION
    assert node.attributes["plugin_namespace"].value == PLUGIN_NAMESPACE
    assert node.attributes["score_on_input"].value == soi
    ids = node.inputs[1]
    assert ids.producer().op_type == "Cast" and ids.producer().attributes["to"].value == ir.DataType.INT32
    assert tuple(node.inputs[3].shape)[0] == tuple(node.inputs[4].shape)[0]  # [E,H,2I], [E,I,H]


@pytest.mark.trt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed")
@pytest.mark.parametrize("lowering,layer", [("gather", None), ("dense", None), ("hybrid", "CONDITION"),
                                            ("trt-native", "MOE")])
def test_tensorrt_parser_takes_the_lowering(block_onnx, lowering, layer):
    import tensorrt_rtx as trt

    model = fused(block_onnx("ref_k1"))
    lower_moe(model, [lowering], "trt:sm100")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(ir.serde.serialize_model(model).SerializeToString())
    assert ok, [parser.get_error(i).desc() for i in range(parser.num_errors)]
    if layer:
        assert any(layer in str(network.get_layer(i).type) for i in range(network.num_layers))


@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 9])
def test_hybrid_takes_both_branches(block_onnx, tokens):
    # ref_k2: E=5, k=2, so T*K <= E (gather) up to T=2 and dense from T=3.
    path = block_onnx("ref_k2")
    model = fused(path)
    lower_moe(model, ["hybrid"], "trt:sm90")
    (if_node,) = [n for n in model.graph if n.op_type == "If"]
    feeds = block_input(seed=tokens, batch=1, seq=tokens)
    assert rel_err(ort_run(model, feeds)[0], ort_run(path, feeds)[0]) <= 1e-5


def test_trt_rtx_refusals_say_why_and_what_builds():
    assert unsupported_reason(parse_target("trt-rtx:sm89"), "gather") is None  # builds (tests/compiler/test_pipeline.py)
    plugin = unsupported_reason(parse_target("trt-rtx:sm120"), "trt-plugin")
    assert "aborts" in plugin and "trt:sm120" in plugin
    function = unsupported_reason(parse_target("trt-rtx:sm89"), "function")
    assert "trt-plugin" not in function and "hybrid, gather or dense" in function
    assert unsupported_reason(parse_target("trt:sm89"), "gather") is None


@pytest.mark.parametrize("text,match", [
    ("trt-rtx:sm90", "TensorRT-RTX cannot target sm90; it targets sm75, sm80, sm86, sm89, sm120, sm121; build sm90 with full TensorRT"),
    ("trt-rtx:sm100", "TensorRT-RTX cannot target sm100"),
    ("trt-rtx:sm42", "unknown arch sm42"),
    ("trt:sm42", "unknown arch sm42"),
    ("trt:sm999", "unknown arch sm999"),
])
def test_arch_is_checked_against_the_flavour(text, match):
    with pytest.raises(MoecError, match=f"target '{text}': {re.escape(match)}"):
        parse_target(text)


@pytest.mark.parametrize("kind", ["trt", "trt-rtx"])
def test_every_listed_arch_parses(kind):
    from moec.passes.targets import ARCHS

    assert [parse_target(f"{kind}:{a}").arch for a in ARCHS[kind]] == list(ARCHS[kind])
    assert {"sm90", "sm100", "sm103", "sm110"} <= set(ARCHS["trt"])
