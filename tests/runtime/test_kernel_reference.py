"""The CPU fallback, the custom op around it, and the launch-config table (no Triton needed)."""

from __future__ import annotations

import pytest
import torch

from moec.common.errors import MoecError
from moec.runtime.kernels.reference import dense_reference, grouped_experts_reference, random_inputs, relative_error


def make_inputs(T, E, K, H, I, dtype):
    return random_inputs(T, E, K, H, I, dtype)


rel_err = relative_error


@pytest.mark.parametrize("score_on_input", [True, False])
@pytest.mark.parametrize("K", [1, 2])
def test_fallback_equals_llama4_dense_formulation(score_on_input, K):
    x, ids, scores, w1, w2 = make_inputs(37, 16, K, 24, 20, torch.float32)
    out = grouped_experts_reference(x, ids, scores, w1, w2, score_on_input)
    dense = dense_reference(x, ids, scores, w1, w2, score_on_input)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)


def test_dense_formulation_is_transformers_llama4_moe():
    """dense_reference with the score on the input is transformers' Llama4TextExperts as called by
    Llama4TextMoe (routed_in = hidden * score, bmm over all experts, sum over experts)."""
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    E, H, I, T = 4, 16, 12, 9
    cfg = Llama4TextConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, hidden_act="silu")
    experts = Llama4TextExperts(cfg)
    x, ids, scores, w1, w2 = make_inputs(T, E, 1, H, I, torch.float32)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w1)
        experts.down_proj.copy_(w2)
        scores_TE = torch.zeros(T, E).scatter_(1, ids, scores)
        routed_in = x.repeat(E, 1) * scores_TE.t().reshape(-1, 1)
        hf = experts(routed_in).view(E, T, H).sum(0)
    torch.testing.assert_close(dense_reference(x, ids, scores, w1, w2, True), hf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped_experts_reference(x, ids, scores, w1, w2, True), hf, rtol=1e-5, atol=1e-6)


def test_fallback_low_precision_accumulates_in_fp32():
    x, ids, scores, w1, w2 = make_inputs(64, 16, 2, 256, 128, torch.bfloat16)
    out = grouped_experts_reference(x, ids, scores, w1, w2, True)
    assert out.dtype == torch.bfloat16
    ref = dense_reference(x.float(), ids, scores, w1.float(), w2.float(), True)
    # Only the final cast to bf16 rounds: half a bf16 ulp, relative.
    assert rel_err(out, ref) < 4e-3


def test_experts_without_tokens_and_one_token():
    x, ids, scores, w1, w2 = make_inputs(1, 128, 2, 16, 8, torch.float32)
    out = grouped_experts_reference(x, ids, scores, w1, w2, False)
    torch.testing.assert_close(out, dense_reference(x, ids, scores, w1, w2, False))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(hidden_TH=a["hidden_TH"][0]), "hidden_TH must be"),
        (lambda a: a.update(expert_ids_TK=a["expert_ids_TK"].float()), "expert_ids_TK must be int32 or int64"),
        (lambda a: a.update(expert_ids_TK=a["expert_ids_TK"][:3]), "expert_ids_TK must be"),
        (lambda a: a.update(scores_TK=a["scores_TK"][:, :1]), "scores_TK must be"),
        (lambda a: a.update(w_gate_up_EHI2=a["w_gate_up_EHI2"][:, :, :-1]), "w_gate_up_EHI2 must be"),
        (lambda a: a.update(w_down_EIH=a["w_down_EIH"][:3]), "w_down_EIH must be"),
        (lambda a: a.update(w_down_EIH=a["w_down_EIH"].half()), "weights must have"),
        (lambda a: a.update(expert_ids_TK=a["expert_ids_TK"] + 16), r"outside \[0, 16\)"),
    ],
)
def test_bad_inputs_are_moec_errors(mutate, match):
    x, ids, scores, w1, w2 = make_inputs(5, 16, 2, 8, 4, torch.float32)
    args = dict(hidden_TH=x, expert_ids_TK=ids, scores_TK=scores, w_gate_up_EHI2=w1, w_down_EIH=w2)
    mutate(args)
    with pytest.raises(MoecError, match=match):
        grouped_experts_reference(**args)


# --- the custom op ----------------------------------------------------------------------------


def test_custom_op_on_cpu_is_the_fallback():
    from moec.runtime.kernels.op import grouped_experts

    x, ids, scores, w1, w2 = make_inputs(11, 16, 2, 16, 8, torch.bfloat16)
    for soi in (1, 0):
        out = grouped_experts(x, ids.int(), scores, w1, w2, score_on_input=soi)
        assert torch.equal(out, grouped_experts_reference(x, ids, scores, w1, w2, bool(soi)))


def test_custom_op_passes_torch_opcheck():
    from moec.runtime.kernels.op import _grouped_experts_op  # noqa: F401  (registers the op)

    x, ids, scores, w1, w2 = make_inputs(6, 4, 2, 8, 4, torch.float32)
    torch.library.opcheck(torch.ops.moec.grouped_experts.default, (x, ids, scores, w1, w2, True))


def test_custom_op_fake_gives_shape_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moec.runtime.kernels.op import grouped_experts

    with FakeTensorMode():
        x, ids, scores, w1, w2 = make_inputs(7, 4, 1, 8, 4, torch.float16)
        out = grouped_experts(x, ids, scores, w1, w2)
    assert out.shape == (7, 8) and out.dtype == torch.float16


def test_custom_op_rejects_other_activation():
    from moec.runtime.kernels.op import grouped_experts

    x, ids, scores, w1, w2 = make_inputs(2, 4, 1, 8, 4, torch.float32)
    with pytest.raises(MoecError, match="activation 'gelu'"):
        grouped_experts(x, ids, scores, w1, w2, activation="gelu")


@pytest.mark.parametrize("K, score_on_input", [(1, 1), (2, 1), (2, 0)])
def test_fallback_matches_the_onnx_op_of_passes_ops(K, score_on_input):
    """The kernel's semantics are passes/ops.py's moec.GroupedExperts: its standard-op function body,
    run by ONNX Runtime, gives the same numbers as the CPU fallback."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort

    from moec.passes import ops

    E, H, I, T = 6, 16, 12, 9
    vals = [ir.val("x", ir.DataType.FLOAT, ir.Shape(["T", H])), ir.val("ids", ir.DataType.INT64, ir.Shape(["T", K])),
            ir.val("s", ir.DataType.FLOAT, ir.Shape(["T", K])), ir.val("w_gu", ir.DataType.FLOAT, ir.Shape([E, H, 2 * I])),
            ir.val("w_d", ir.DataType.FLOAT, ir.Shape([E, I, H]))]
    op = ops.OpBuilder()
    y = ops.grouped_experts(op, *vals, k=K, score_on_input=score_on_input)
    y.name = "y"
    model = ir.Model(ir.Graph(vals, [y], nodes=op.nodes, opset_imports={"": 20}), ir_version=10)
    ops.attach_functions(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    x, ids, scores, w1, w2 = random_inputs(T, E, K, H, I, torch.float32)
    (onnx_y,) = sess.run(None, {"x": x.numpy(), "ids": ids.numpy(), "s": scores.numpy(), "w_gu": w1.numpy(), "w_d": w2.numpy()})
    ours = grouped_experts_reference(x, ids, scores, w1, w2, bool(score_on_input))
    np.testing.assert_allclose(ours.numpy(), onnx_y, rtol=1e-5, atol=1e-5)
