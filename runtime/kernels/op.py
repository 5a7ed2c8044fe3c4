"""``torch.ops.moec.grouped_experts``: the routed experts as one torch custom op.

On CUDA tensors it runs the Triton kernels (moe_triton.py); on any other device the plain-torch
reference (the CPU fallback). A fake implementation gives shapes to torch.compile / export and to
the TensorRT plugin's shape logic without running anything. Triton is imported only when a CUDA
call is made, so ``import moec.runtime.kernels.op`` works on machines without it.
"""

from __future__ import annotations

import torch

from moec.common.errors import MoecError
from moec.runtime.kernels.reference import check_inputs, grouped_experts_reference

OP_NAME = "moec::grouped_experts"


@torch.library.custom_op(OP_NAME, mutates_args=())
def _grouped_experts_op(
    hidden_TH: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    scores_TK: torch.Tensor,
    w_gate_up_EHI2: torch.Tensor,
    w_down_EIH: torch.Tensor,
    score_on_input: bool,
) -> torch.Tensor:
    return grouped_experts_reference(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, score_on_input)


@_grouped_experts_op.register_kernel("cuda")
def _grouped_experts_cuda(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, score_on_input):
    try:
        from moec.runtime.kernels.moe_triton import grouped_experts_triton
    except ImportError as exc:
        raise MoecError(
            f"moec::grouped_experts on CUDA needs Triton ({exc}); install it with `pip install triton`."
        ) from exc
    return grouped_experts_triton(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, score_on_input)


@_grouped_experts_op.register_fake
def _grouped_experts_fake(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, score_on_input):
    check_inputs(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH)
    return hidden_TH.new_empty(hidden_TH.shape)


def grouped_experts(
    hidden_TH: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    scores_TK: torch.Tensor,
    w_gate_up_EHI2: torch.Tensor,
    w_down_EIH: torch.Tensor,
    *,
    activation: str = "swiglu",
    score_on_input: bool | int = True,
) -> torch.Tensor:
    """The ``moec.GroupedExperts`` op with its ONNX attributes (``k`` is expert_ids_TK's width).

    hidden_TH [T, H] bf16/fp16/fp32, expert_ids_TK [T, k] int32/int64, scores_TK [T, k],
    w_gate_up_EHI2 [E, H, 2I] (gate first half), w_down_EIH [E, I, H]; returns [T, H] in
    hidden_TH's dtype. score_on_input 1: the score scales the expert input (Llama 4); 0: its output.
    """
    check_inputs(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, activation)
    return torch.ops.moec.grouped_experts(
        hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, bool(score_on_input)
    )
