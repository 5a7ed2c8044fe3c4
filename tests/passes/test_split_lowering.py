"""The split lowering (per-expert weights: an If tree for one token, per-expert groups for more):
it fires on every routing the fusions produce, refuses what it cannot express, keeps the numbers
on both of its branches."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from conftest import block_input, ort_run, rel_err

from moec.common.errors import MoecError
from moec.passes.fusions._graph import FusionLog
from moec.passes.fusions.grouped_experts import fuse_grouped_experts
from moec.passes.fusions.moe_gating import fuse_moe_gating
from moec.passes.lowerings import lower_moe
from moec.passes.targets import lowerings_for, parse_target

BLOCKS = ("ref_k1", "ref_k2", "softmax_k2", "unrolled_in", "unrolled_out")


def fused(path) -> ir.Model:
    model = ir.load(path)
    assert fuse_moe_gating(model) == 1 and fuse_grouped_experts(model) == 1
    return model


def _subgraph_ops(graph: ir.Graph) -> list[str]:
    found = []
    for node in graph:
        found.append(node.op_type)
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found += _subgraph_ops(attr.value)
    return found


@pytest.mark.parametrize("block", BLOCKS)
def test_split_fires_with_per_expert_weights(block_onnx, block):
    model = fused(block_onnx(block))
    assert lower_moe(model, ["split"], "ort") == {"split": 1}
    assert not [n for n in model.graph if n.domain == "moec"]
    (phase,) = [n for n in model.graph if n.op_type == "If"]
    one, many = phase.attributes["then_branch"].value, phase.attributes["else_branch"].value
    experts = len([n for n in model.graph.initializers if ".split" in n]) // 2
    k = 2 if block.endswith("k2") else 1
    # One token: K trees of E leaves (E - 1 Ifs each); more: one ScatterND per expert.
    assert _subgraph_ops(one).count("If") == k * (experts - 1)
    assert _subgraph_ops(many).count("ScatterND") == experts
    # The stacked originals are gone: each expert is held once.
    assert all(tuple(v.shape)[0] != experts or len(v.shape) != 3 for v in model.graph.initializers.values())


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 9), (3, 7)])
def test_split_keeps_numbers_on_both_branches(block_onnx, block, batch, seq):
    path = block_onnx(block)
    model = fused(path)
    lower_moe(model, ["split"], "ort")
    for seed in range(3):  # other tokens pick other experts (and other tree leaves)
        feeds = block_input(seed=seed, batch=batch, seq=seq)
        assert rel_err(ort_run(model, feeds)[0], ort_run(path, feeds)[0]) <= 1e-5


def test_split_refuses_expert_weights_that_are_not_initializers(block_onnx):
    model = fused(block_onnx("ref_k1"))
    (experts,) = [n for n in model.graph if n.op_type == "GroupedExperts"]
    w = experts.inputs[3]
    graph_input = ir.Value(name="w_gate_up_in", shape=w.shape, type=w.type)
    model.graph.inputs.append(graph_input)
    experts.replace_input_with(3, graph_input)
    with pytest.raises(MoecError, match=r"target ort: .*split: expert weight 'w_gate_up_in' is not a constant"):
        lower_moe(model, ["split"], "ort")
    log = FusionLog()
    assert lower_moe(model, ["split", "hybrid"], "ort", log) == {"hybrid": 1}
    assert "not a constant initializer" in log.refusals[0].reason


@pytest.mark.parametrize("target", ["trt:sm90", "trt-rtx:sm89"])
def test_split_is_not_offered_to_tensorrt(target):
    with pytest.raises(MoecError, match=f"target {target}: MoE lowering 'split' cannot run there"):
        lowerings_for(parse_target(target), "split")
