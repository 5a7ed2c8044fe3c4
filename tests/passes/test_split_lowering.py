"""The split lowering (per-expert weights, tokens sorted by expert, each expert's rows sliced, multiplied and
put back): it fires on every routing the fusions produce, refuses what it cannot express
(and what the ort default should leave to com.microsoft.MoE), keeps the numbers for one token and
for many, and feeds each expert's weights to one MatMul pair."""

from __future__ import annotations

import numpy as np
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
    experts = len([n for n in model.graph.initializers if ".split" in n]) // 2
    ops = _subgraph_ops(model.graph)
    assert "If" not in ops and ops.count("MatMul") == 2 * experts
    # Sorted once a layer: per expert only its two MatMuls. The rows are cut by expert with one
    # Split before each MatMul stage, and one SwiGLU runs on all experts' rows; no per-expert
    # Slice, mask, NonZero, GatherND or ScatterND (each a node run per expert and step, issue 20);
    # the rows go back by a Gather on the inverse of the sort's order.
    assert ops.count("Slice") == 0 and "ScatterND" not in ops
    cuts = [n for n in model.graph if n.op_type == "Split" and len(n.outputs) == experts]
    assert len(cuts) == 2 and ops.count("Mul") - ops.count("Sigmoid") < experts
    assert "NonZero" not in ops and "GatherND" not in ops
    # Each expert's weights feed one MatMul (ONNX Runtime prepacks a weight once per consuming
    # node, and keeps a subgraph's outer-scope weight besides), and the stacked originals are
    # gone: each expert is held once.
    users = [len(v.uses()) for name, v in model.graph.initializers.items() if ".split" in name]
    assert len(users) == 2 * experts and set(users) == {1}
    assert all(tuple(v.shape)[0] != experts or len(v.shape) != 3 for v in model.graph.initializers.values())


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 9), (3, 7)])
def test_split_keeps_numbers_on_both_branches(block_onnx, block, batch, seq):
    path = block_onnx(block)
    model = fused(path)
    lower_moe(model, ["split"], "ort")
    for seed in range(3):  # other tokens pick other experts
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


def test_ort_default_leaves_many_experts_to_com_microsoft_moe(block_onnx, monkeypatch):
    import moec.passes.lowerings.split as split

    monkeypatch.setattr(split, "DEFAULT_MAX_EXPERTS", 3)  # ref_k1 has 4 experts
    order = lowerings_for(parse_target("ort"), None)
    assert order[0] == "split"
    model, log = fused(block_onnx("ref_k1")), FusionLog()
    assert lower_moe(model, order, "ort", log, by_default=True) == {"ort": 1}
    assert "4 experts" in log.refusals[0].reason and "--moe-lowering split" in log.refusals[0].reason
    # Asked for by name, split takes the layer whatever its expert count.
    assert lower_moe(fused(block_onnx("ref_k1")), ["split"], "ort", by_default=False) == {"split": 1}


def _with_int8_experts(path, which: tuple[int, ...]) -> ir.Model:
    """The fused block with DequantizeLinear(int8, one scale) on expert weight inputs ``which``."""
    model = fused(path)
    (experts,) = [n for n in model.graph if n.op_type == "GroupedExperts"]
    scale = ir.Value(name="w_scale", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(np.array(0.01, np.float32)))
    model.graph.register_initializer(scale)
    for i in which:
        w = experts.inputs[i]
        q = ir.Value(name=f"w{i}_q", shape=w.shape, type=ir.TensorType(ir.DataType.INT8),
                     const_value=ir.tensor(np.zeros(tuple(w.shape), np.int8)))
        model.graph.register_initializer(q)
        dq = ir.Node("", "DequantizeLinear", [q, scale], name=f"dq{i}")
        model.graph.insert_before(experts, dq)
        experts.replace_input_with(i, dq.outputs[0])
    return model


def test_split_refuses_quantized_experts_it_cannot_run(block_onnx):
    # Only the gate_up quantized: split (like QMoE) takes both or neither.
    log = FusionLog()
    assert lower_moe(_with_int8_experts(block_onnx("ref_k1"), (3,)), ["split", "hybrid"], "ort", log) == {"hybrid": 1}
    assert "only one of the two expert weights is quantized" in log.refusals[0].reason
    # Both int8: 8-bit MatMulNBits with float activations is slower than fp32; QMoE takes them.
    log = FusionLog()
    assert lower_moe(_with_int8_experts(block_onnx("ref_k1"), (3, 4)), ["split", "hybrid"], "ort", log) == {"hybrid": 1}
    assert "8-bit" in log.refusals[0].reason and "QMoE takes int8 experts" in log.refusals[0].reason
