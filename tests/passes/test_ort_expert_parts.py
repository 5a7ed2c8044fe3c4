"""The ort lowering's expert slices (passes/lowerings/ort.py, EXPERT_PARTS): for sigmoid top-1
routing every expert becomes ``parts`` slices of its intermediate size, so com.microsoft.MoE runs
one token's expert on that many threads. Fires for Llama 4 routing, not for softmax routing or an
intermediate size the slices do not divide; the numbers stay those of the unfused block."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from conftest import block_input, ort_run, rel_err

from moec.passes.fusions.grouped_experts import fuse_grouped_experts
from moec.passes.fusions.moe_gating import fuse_moe_gating
from moec.passes.lowerings import lower_moe
from moec.passes.lowerings import ort as ort_lowering


def fused(path) -> tuple[ir.Model, int, int]:
    """The block with its MoE fused, and the experts' (E, I)."""
    model = ir.load(path)
    assert fuse_moe_gating(model) == 1 and fuse_grouped_experts(model) == 1
    (node,) = [n for n in model.graph if n.op_type == "GroupedExperts"]
    E, _, I2 = node.inputs[3].shape
    return model, int(E), int(I2) // 2


def lowered(path) -> tuple[ir.Model, ir.Node, tuple[int, ...]]:
    model, _, _ = fused(path)
    assert lower_moe(model, ["ort"], "ort") == {"ort": 1}
    (moe,) = [n for n in model.graph if n.domain == "com.microsoft" and n.op_type == "MoE"]
    return model, moe, tuple(moe.inputs[2].shape)


def experts_of(path) -> tuple[int, int]:
    return fused(path)[1:]


@pytest.mark.parametrize("parts", [2, 4])
def test_sigmoid_top1_experts_are_cut_into_parts(block_onnx, monkeypatch, parts):
    monkeypatch.setattr(ort_lowering, "EXPERT_PARTS", parts)
    E, I = experts_of(block_onnx("ref_k1"))
    _, moe, fc1_shape = lowered(block_onnx("ref_k1"))
    assert moe.attributes["k"].value == parts
    assert fc1_shape[:2] == (parts * E, 2 * I // parts)
    assert tuple(moe.inputs[4].shape)[::2] == (parts * E, I // parts)


@pytest.mark.parametrize("block", ["softmax_k2", "ref_k1"])
def test_parts_do_not_fire_for_softmax_or_an_indivisible_intermediate(block_onnx, monkeypatch, block):
    E, I = experts_of(block_onnx(block))
    if block == "ref_k1":
        monkeypatch.setattr(ort_lowering, "EXPERT_PARTS", I + 1)  # does not divide I
    _, moe, fc1_shape = lowered(block_onnx(block))
    assert fc1_shape[:2] == (E, 2 * I)
    assert moe.attributes["k"].value == (2 if block == "softmax_k2" else 1)


@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("block", ["ref_k1", "unrolled_in"])
@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 7)])
def test_parts_keep_the_numbers(block_onnx, monkeypatch, block, parts, batch, seq):
    monkeypatch.setattr(ort_lowering, "EXPERT_PARTS", parts)
    path = block_onnx(block)
    model, _, _ = lowered(path)
    feeds = block_input(seed=5, batch=batch, seq=seq)
    (before,), (after,) = ort_run(path, feeds), ort_run(model, feeds)
    assert rel_err(after, before) <= 1e-5
