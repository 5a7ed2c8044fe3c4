"""fuse_moe_gating / fuse_grouped_experts / fuse_rms_norm: fires, must not fire, same numbers."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from conftest import BLOCKS, assert_as_close_as_unfused, block_input, fp32_reference, ort_run, rel_err

from moec.common.contract import MOEC_DOMAIN
from moec.passes.fusions._graph import FusionLog
from moec.passes.fusions.grouped_experts import fuse_grouped_experts
from moec.passes.fusions.moe_gating import fuse_moe_gating
from moec.passes.fusions.rms_norm import fuse_rms_norm


def fuse(model: ir.Model) -> tuple[int, int, FusionLog]:
    log = FusionLog()
    return fuse_moe_gating(model, log), fuse_grouped_experts(model, log), log


@pytest.mark.parametrize("name", ["ref_k1", "ref_k2", "softmax_k2", "unrolled_in", "unrolled_out"])
def test_moe_fusions_fire_and_keep_numbers(block_onnx, name):
    path = block_onnx(name)
    model = ir.load(path)
    gating, experts, log = fuse(model)
    assert (gating, experts) == (1, 1), log.refusals
    moec_ops = sorted(n.op_type for n in model.graph if n.domain == MOEC_DOMAIN)
    assert moec_ops == ["GroupedExperts", "MoEGating"]
    # The routed experts are gone: only the shared expert's three MatMul/Gemm remain besides the router.
    assert sum(n.op_type in ("MatMul", "Gemm") for n in model.graph) == 4
    feeds = block_input()
    (before,), (after,) = ort_run(path, feeds), ort_run(model, feeds)
    assert rel_err(after, before) <= 1e-5


def test_fused_fp16_block_keeps_numbers(block_onnx):
    path = block_onnx("ref_k1", "fp16")
    model = ir.load(path)
    assert fuse(model)[:2] == (1, 1)
    feeds = block_input("fp16")
    (before,), (after,) = ort_run(path, feeds), ort_run(model, feeds)
    assert_as_close_as_unfused(after, before, fp32_reference(BLOCKS["ref_k1"](), feeds))


def test_fp16_check_fails_on_a_wrong_rounding(block_onnx):
    """The check above, on the fused block with its expert weights rounded to 4 mantissa bits
    instead of fp16's 10 (a rewrite that rounds wrongly): it must fail."""
    import numpy as np

    path = block_onnx("ref_k1", "fp16")
    model = ir.load(path)
    fuse(model)
    experts = next(n for n in model.graph if n.op_type == "GroupedExperts")
    for v in experts.inputs:
        if v is not None and v.const_value is not None and v.dtype == ir.DataType.FLOAT16:
            m, e = np.frexp(v.const_value.numpy().astype(np.float32))
            v.const_value = ir.tensor(np.ldexp(np.round(m * 32) / 32, e).astype(np.float16), name=v.name)
    feeds = block_input("fp16")
    (before,), (after,) = ort_run(path, feeds), ort_run(model, feeds)
    with pytest.raises(AssertionError, match="rewritten graph"):
        assert_as_close_as_unfused(after, before, fp32_reference(BLOCKS["ref_k1"](), feeds))


def test_second_consumer_of_topk_values_refuses_gating(block_onnx):
    model = ir.load(block_onnx("ref_k1"))
    topk = next(n for n in model.graph if n.op_type == "TopK")
    model.graph.outputs.append(topk.outputs[0])
    gating, experts, log = fuse(model)
    assert (gating, experts) == (0, 0)
    assert any("graph output" in r.reason or "second consumer" in r.reason for r in log.refusals), log.refusals
    assert log.refusals[0].node == topk.name


def test_second_consumer_of_dense_scores_refuses_experts(block_onnx):
    model = ir.load(block_onnx("ref_k1"))
    sigmoid = next(n for n in model.graph if n.op_type == "Sigmoid" and n.inputs[0].producer().op_type == "ScatterElements")
    model.graph.outputs.append(sigmoid.outputs[0])
    gating, experts, log = fuse(model)
    assert gating == 1 and experts == 0
    assert any("score matrix" in r.reason or "graph output" in r.reason for r in log.refusals), log.refusals


def test_unsupported_dtype_refused(tmp_path):
    import moe_blocks as mb
    import torch

    mb.DTYPES["fp64"] = torch.float64
    try:
        path = mb.export_block(mb.RefMoE(k=1), tmp_path / "f64.onnx", dtype="fp64")
    finally:
        del mb.DTYPES["fp64"]
    gating, experts, log = fuse(ir.load(path))
    assert (gating, experts) == (0, 0)
    assert any("dtype" in r.reason for r in log.refusals), log.refusals


def test_non_constant_k_refused(block_onnx):
    model = ir.load(block_onnx("ref_k1"))
    topk = next(n for n in model.graph if n.op_type == "TopK")
    k_input = ir.val("k", ir.DataType.INT64, ir.Shape([1]))
    model.graph.inputs.append(k_input)
    topk.replace_input_with(1, k_input)
    gating, _, log = fuse(model)
    assert gating == 0
    assert any("not a constant" in r.reason for r in log.refusals)


def test_no_moe_graph_fuses_nothing(block_onnx, tmp_path):
    import moe_blocks as mb

    path = mb.export_block(mb.SwiGLU(16, 24), tmp_path / "mlp.onnx", hidden=16)
    model = ir.load(path)
    assert fuse(model)[:2] == (0, 0)


def test_rms_norm_fuses_demo_export(demo_onnx):
    model = ir.load(demo_onnx)
    log = FusionLog()
    # llama4-tiny: 4 layers x (input + post-attention norm) + the final norm.
    assert fuse_rms_norm(model, log) == 9
    assert sum(n.op_type == "RMSNormalization" for n in model.graph) == 9


def test_rms_norm_refused_without_opset_upgrade(demo_onnx):
    model = ir.load(demo_onnx)
    log = FusionLog()
    assert fuse_rms_norm(model, log, allow_opset_upgrade=False) == 0
    assert "opset" in log.refusals[0].reason
