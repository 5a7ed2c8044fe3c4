"""Generated cases: random E, k, H, I, interleave step, dtype and MoE form; fused and unfused
graphs agree and one gating + one experts op is fused per MoE layer. Each example exports a model
(seconds of CPU), so the example count stays small."""

from __future__ import annotations

import onnx_ir as ir
from conftest import assert_as_close_as_unfused, block_input, fp32_reference, ort_run, rel_err
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import moe_blocks as mb
from moec.passes.fusions._graph import FusionLog
from moec.passes.fusions.grouped_experts import fuse_grouped_experts
from moec.passes.fusions.moe_gating import fuse_moe_gating
from moec.passes.lowerings import lower_moe


@st.composite
def cases(draw):
    experts = draw(st.integers(2, 6))
    return dict(
        experts=experts,
        k=draw(st.integers(1, min(experts, 3))),
        hidden=draw(st.sampled_from([8, 12, 16])),
        inter=draw(st.sampled_from([4, 8, 20])),
        step=draw(st.sampled_from([1, 2])),
        dtype=draw(st.sampled_from(["fp32", "fp32", "fp16"])),
        form=draw(st.sampled_from(["ref", "softmax", "unrolled"])),
        seed=draw(st.integers(0, 1000)),
    )


# No shrinking: each shrink step is another export; a failure prints its full case anyway.
@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(case=dict(experts=2, k=1, hidden=8, inter=4, step=1, dtype="fp16", form="softmax", seed=0))
@given(case=cases())
def test_fused_and_unfused_agree(tmp_path, case):
    make = {
        "ref": lambda s: mb.RefMoE(case["hidden"], case["inter"], case["experts"], case["k"], seed=s),
        "softmax": lambda s: mb.SoftmaxMoE(case["hidden"], case["inter"], case["experts"], case["k"], seed=s),
        "unrolled": lambda s: mb.UnrolledMoE(case["hidden"], case["inter"], case["experts"], case["k"], seed=s,
                                             score_on_input=case["seed"] % 2 == 0),
    }[case["form"]]
    def make_stack():
        return mb.MoEStack(make, layers=2, interleave_step=case["step"], hidden=case["hidden"], inter=case["inter"],
                           seed=case["seed"])

    stack = make_stack()
    path = mb.export_block(stack, tmp_path / f"case_{case['seed']}.onnx", dtype=case["dtype"], hidden=case["hidden"])
    model = ir.load(path)
    log = FusionLog()
    n_layers = len(stack.moe_layers)
    assert fuse_moe_gating(model, log) == n_layers, log.refusals
    assert fuse_grouped_experts(model, log) == n_layers, log.refusals
    feeds = block_input(case["dtype"], seed=case["seed"], hidden=case["hidden"])
    (before,) = ort_run(path, feeds)
    if case["dtype"] == "fp32":
        assert rel_err(ort_run(model, feeds)[0], before) <= 1e-5
        lower_moe(model, ["gather"], "ort")
        assert rel_err(ort_run(model, feeds)[0], before) <= 1e-5
    else:  # fp16: each graph against fp32, not one fp16 result against the other (conftest.py)
        ref = fp32_reference(make_stack(), feeds)
        assert_as_close_as_unfused(ort_run(model, feeds)[0], before, ref)
        lower_moe(model, ["gather"], "ort")
        assert_as_close_as_unfused(ort_run(model, feeds)[0], before, ref)
