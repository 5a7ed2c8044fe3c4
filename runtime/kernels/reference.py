"""The routed-experts computation of a MoE layer in plain torch: the semantics every kernel matches.

``grouped_experts_reference`` is both the CPU fallback (machines without a GPU run the
``moec::grouped_experts`` op through it) and the reference the Triton kernels are tested against.
``dense_reference`` is the formulation transformers' Llama 4 uses (a bmm over ALL experts with a
dense [T, E] score matrix); it costs E times the compute and serves only as a second witness.

Semantics (the ``moec.GroupedExperts`` op of passes/ops.py):
    for each token t and each of its k choices (e = expert_ids_TK[t, j], s = scores_TK[t, j]
    cast to the hidden dtype):
        x = s * hidden_TH[t]                      if score_on_input (Llama 4) else hidden_TH[t]
        g, u = x @ w_gate_up_EHI2[e][:, :I], x @ w_gate_up_EHI2[e][:, I:]   (gate is the first half)
        y = (SiLU(g) * u) @ w_down_EIH[e]
        out_TH[t] += y                            if score_on_input else s * y
Everything is computed in fp32 and the result is returned in the hidden state's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moec.common.errors import MoecError


def check_inputs(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, activation: str = "swiglu") -> None:
    """Raise MoecError naming the tensor whose shape or dtype does not fit the op's schema.

    Expert ids are not range-checked here: that needs the values (a host sync on a GPU). The
    reference checks them; the Triton kernels skip a pair whose id is outside [0, E) rather than
    read or write past their buffers. On the decode path with k > 1 or a split down GEMM (where
    the output is accumulated) the pair then adds nothing; elsewhere its token's output is
    undefined. Every other token is unaffected.
    """
    if activation != "swiglu":
        raise MoecError(f"moec.GroupedExperts: activation {activation!r} is not supported; only 'swiglu' is.")
    if hidden_TH.dim() != 2:
        raise MoecError(f"moec.GroupedExperts: hidden_TH must be [T, H], got shape {tuple(hidden_TH.shape)}.")
    if not hidden_TH.is_floating_point():
        raise MoecError(f"moec.GroupedExperts: hidden_TH must be a float tensor, got {hidden_TH.dtype}.")
    T, H = hidden_TH.shape
    if expert_ids_TK.dim() != 2 or expert_ids_TK.shape[0] != T or expert_ids_TK.shape[1] < 1:
        raise MoecError(
            f"moec.GroupedExperts: expert_ids_TK must be [T={T}, k>=1], got shape {tuple(expert_ids_TK.shape)}."
        )
    if expert_ids_TK.dtype not in (torch.int32, torch.int64):
        raise MoecError(f"moec.GroupedExperts: expert_ids_TK must be int32 or int64, got {expert_ids_TK.dtype}.")
    if tuple(scores_TK.shape) != tuple(expert_ids_TK.shape) or not scores_TK.is_floating_point():
        raise MoecError(
            f"moec.GroupedExperts: scores_TK must be a float tensor shaped like expert_ids_TK "
            f"{tuple(expert_ids_TK.shape)}, got {tuple(scores_TK.shape)} {scores_TK.dtype}."
        )
    if w_gate_up_EHI2.dim() != 3 or w_gate_up_EHI2.shape[1] != H or w_gate_up_EHI2.shape[2] % 2:
        raise MoecError(
            f"moec.GroupedExperts: w_gate_up_EHI2 must be [E, H={H}, 2I], got shape {tuple(w_gate_up_EHI2.shape)}."
        )
    E, _, I2 = w_gate_up_EHI2.shape
    if tuple(w_down_EIH.shape) != (E, I2 // 2, H):
        raise MoecError(
            f"moec.GroupedExperts: w_down_EIH must be [E={E}, I={I2 // 2}, H={H}] to match w_gate_up_EHI2, "
            f"got shape {tuple(w_down_EIH.shape)}."
        )
    if w_gate_up_EHI2.dtype != hidden_TH.dtype or w_down_EIH.dtype != hidden_TH.dtype:
        raise MoecError(
            f"moec.GroupedExperts: weights must have the hidden state's dtype {hidden_TH.dtype}, got "
            f"w_gate_up_EHI2 {w_gate_up_EHI2.dtype} and w_down_EIH {w_down_EIH.dtype}."
        )


def _check_expert_range(expert_ids_TK, num_experts: int) -> None:
    if expert_ids_TK.numel() and (int(expert_ids_TK.min()) < 0 or int(expert_ids_TK.max()) >= num_experts):
        raise MoecError(
            f"moec.GroupedExperts: expert_ids_TK holds ids outside [0, {num_experts}) "
            f"(min {int(expert_ids_TK.min())}, max {int(expert_ids_TK.max())}); the router and the weights disagree."
        )


def grouped_experts_reference(
    hidden_TH: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    scores_TK: torch.Tensor,
    w_gate_up_EHI2: torch.Tensor,
    w_down_EIH: torch.Tensor,
    score_on_input: bool = True,
) -> torch.Tensor:
    """The op's semantics in fp32, returned in ``hidden_TH.dtype``.

    Token-expert pairs are sorted by expert and each expert present runs one matmul over its
    tokens. The loop is over experts present (at most min(T*k, E) iterations), never over tokens:
    gathering a weight matrix per pair would materialize [T*k, H, 2I], and the dense formulation
    costs E times the FLOPs; the loop reads each used expert's weights once, which is what a CPU
    fallback wants.
    """
    check_inputs(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH)
    T, H = hidden_TH.shape
    K = expert_ids_TK.shape[1]
    E, _, I2 = w_gate_up_EHI2.shape
    I = I2 // 2
    _check_expert_range(expert_ids_TK, E)

    ids_P = expert_ids_TK.reshape(-1).long()  # pair p = t * K + j
    # passes/ops.py: scores are cast to the hidden dtype before use (a float32 score from the
    # router is rounded to bf16 in a bf16 model).
    scores_P = scores_TK.reshape(-1).to(hidden_TH.dtype).float()
    order_P = torch.argsort(ids_P, stable=True)
    counts_E = torch.bincount(ids_P, minlength=E)
    x_PH = hidden_TH.float()[order_P // K]
    if score_on_input:
        x_PH = x_PH * scores_P[order_P, None]

    y_PH = torch.empty(T * K, H, dtype=torch.float32, device=hidden_TH.device)
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gu_MI2 = x_PH[rows] @ w_gate_up_EHI2[e].float()
        a_MI = F.silu(gu_MI2[:, :I]) * gu_MI2[:, I:]
        y_PH[order_P[rows]] = a_MI @ w_down_EIH[e].float()
        start += count
    if not score_on_input:
        y_PH = y_PH * scores_P[:, None]
    return y_PH.view(T, K, H).sum(dim=1).to(hidden_TH.dtype)


def dense_reference(
    hidden_TH: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    scores_TK: torch.Tensor,
    w_gate_up_EHI2: torch.Tensor,
    w_down_EIH: torch.Tensor,
    score_on_input: bool = True,
) -> torch.Tensor:
    """transformers' Llama 4 formulation: every token through every expert, in fp32.

    The sparse scores become a dense [T, E] matrix (zero for experts not chosen). With the score
    on the input an unchosen expert sees a zero input and SiLU(0) * 0 = 0, so it adds nothing;
    with the score on the output its result is multiplied by zero.
    """
    check_inputs(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH)
    T, H = hidden_TH.shape
    E, _, I2 = w_gate_up_EHI2.shape
    I = I2 // 2
    _check_expert_range(expert_ids_TK, E)
    scores_TE = torch.zeros(T, E, dtype=torch.float32, device=hidden_TH.device)
    scores_TE.scatter_(1, expert_ids_TK.long(), scores_TK.to(hidden_TH.dtype).float())
    x_ETH = hidden_TH.float().unsqueeze(0).expand(E, T, H)
    if score_on_input:
        x_ETH = x_ETH * scores_TE.t().unsqueeze(-1)
    gu_ETI2 = torch.bmm(x_ETH, w_gate_up_EHI2.float())
    y_ETH = torch.bmm(F.silu(gu_ETI2[..., :I]) * gu_ETI2[..., I:], w_down_EIH.float())
    if not score_on_input:
        y_ETH = y_ETH * scores_TE.t().unsqueeze(-1)
    return y_ETH.sum(dim=0).to(hidden_TH.dtype)


def random_inputs(T: int, E: int, K: int, H: int, I: int, dtype=torch.float32, device="cpu", seed: int | None = None):
    """Random op inputs of Llama-4-like scale (weights ~ 1/sqrt(fan_in)); each token picks K
    distinct experts, as top-k does. Shared by the tests and benchmarks/kernel_bench.py."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    x = torch.randn(T, H, generator=gen).to(dtype)
    w1 = (torch.randn(E, H, 2 * I, generator=gen) / H**0.5).to(dtype)
    w2 = (torch.randn(E, I, H, generator=gen) / I**0.5).to(dtype)
    ids = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :K]
    scores = torch.rand(T, K, generator=gen)
    return tuple(t.to(device) for t in (x, ids, scores, w1, w2))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (Frobenius norm over the whole output)."""
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
