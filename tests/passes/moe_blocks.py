"""Small MoE blocks written the ways MoE models are written, exported to ONNX to feed the pass tests.

- ``RefMoE``: Llama 4's formulation (transformers' Llama4TextMoe / Llama4Router / Llama4TextExperts):
  router Linear, top-k on the raw logits, a scatter into a -inf matrix, sigmoid, the hidden state
  repeated E times and scaled by the dense score matrix (score on the INPUT), a bmm over all E
  experts with gate_up [E, H, 2I] (gate first half) and down [E, I, H], a sum over experts, plus a
  shared SwiGLU expert.
- ``SoftmaxMoE``: the Mixtral-style variant in the same dense-over-experts form: softmax, top-k,
  renormalized top-k weights scattered into a zero matrix, scores scale the expert OUTPUT.
- ``UnrolledMoE``: the per-expert form an unrolled expert loop exports to: each expert is its own
  chain of MatMuls (separate gate/up/down Linears) scaled by its column of the dense score matrix.
- ``MoEStack``: layers of ``x + block(x)`` where every ``interleave_step``-th layer is MoE and the
  others a dense SwiGLU MLP (Llama 4 Maverick interleaves with step 2).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _init_(module: nn.Module, seed: int) -> None:
    # Large enough weights that a wrong expert or a wrong score shows in the output.
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 1.0))


class RefMoE(nn.Module):
    score_on_input = True

    def __init__(self, hidden: int = 16, inter: int = 24, experts: int = 4, k: int = 1, shared: bool = True, seed: int = 0):
        super().__init__()
        self.hidden, self.inter, self.experts, self.k = hidden, inter, experts, k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(experts, hidden, 2 * inter))  # [E, H, 2I]
        self.down_proj = nn.Parameter(torch.empty(experts, inter, hidden))  # [E, I, H]
        self.shared_expert = SwiGLU(hidden, inter) if shared else None
        _init_(self, seed)

    def forward(self, x_BSH):
        x_TH = x_BSH.reshape(-1, self.hidden)
        logits_TE = self.router(x_TH)
        top_v, top_i = torch.topk(logits_TE, self.k, dim=1)
        scores_TE = torch.full_like(logits_TE, float("-inf")).scatter_(1, top_i, top_v)
        scores_TE = torch.sigmoid(scores_TE.float()).to(scores_TE.dtype)
        routed_in = x_TH.repeat(scores_TE.shape[1], 1)
        routed_in = routed_in * scores_TE.transpose(0, 1).reshape(-1, 1)
        h_ETH = routed_in.view(self.experts, -1, self.hidden)
        gate_up = torch.bmm(h_ETH, self.gate_up_proj)
        gate, up = gate_up.chunk(2, dim=-1)
        routed_out = torch.bmm(up * F.silu(gate), self.down_proj).view(-1, self.hidden)
        out = routed_out.reshape(self.experts, -1, self.hidden).sum(dim=0)
        if self.shared_expert is not None:
            out = self.shared_expert(x_TH) + out
        return out.reshape(x_BSH.shape)


class SoftmaxMoE(RefMoE):
    score_on_input = False

    def forward(self, x_BSH):
        x_TH = x_BSH.reshape(-1, self.hidden)
        logits_TE = self.router(x_TH)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        top_v, top_i = torch.topk(probs_TE, self.k, dim=-1)
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)
        weights_TE = torch.zeros_like(probs_TE).scatter(1, top_i, top_v).to(x_TH.dtype)
        h_ETH = x_TH.unsqueeze(0).expand(self.experts, -1, -1)
        gate_up = torch.bmm(h_ETH, self.gate_up_proj)
        gate, up = gate_up.chunk(2, dim=-1)
        y_ETH = torch.bmm(up * F.silu(gate), self.down_proj)
        out = (y_ETH * weights_TE.transpose(0, 1).unsqueeze(-1)).sum(dim=0)
        if self.shared_expert is not None:
            out = self.shared_expert(x_TH) + out
        return out.reshape(x_BSH.shape)


class UnrolledMoE(nn.Module):
    """Llama 4 routing with one SwiGLU module per expert, run one after another."""

    def __init__(self, hidden: int = 16, inter: int = 24, experts: int = 4, k: int = 1, shared: bool = True,
                 score_on_input: bool = True, seed: int = 0):
        super().__init__()
        self.hidden, self.inter, self.experts, self.k = hidden, inter, experts, k
        self.score_on_input = score_on_input
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts_ = nn.ModuleList(SwiGLU(hidden, inter) for _ in range(experts))
        self.shared_expert = SwiGLU(hidden, inter) if shared else None
        _init_(self, seed)

    def forward(self, x_BSH):
        x_TH = x_BSH.reshape(-1, self.hidden)
        logits_TE = self.router(x_TH)
        top_v, top_i = torch.topk(logits_TE, self.k, dim=1)
        scores_TE = torch.full_like(logits_TE, float("-inf")).scatter_(1, top_i, top_v)
        scores_TE = torch.sigmoid(scores_TE.float()).to(scores_TE.dtype)
        out = self.shared_expert(x_TH) if self.shared_expert is not None else torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts_):
            s_T1 = scores_TE[:, e : e + 1]
            out = out + (expert(x_TH * s_T1) if self.score_on_input else expert(x_TH) * s_T1)
        return out.reshape(x_BSH.shape)

    def stacked_weights(self):
        """(w_gate_up_EHI2, w_down_EIH) of the experts, as the fused op takes them."""
        gu = torch.stack([torch.cat([m.gate_proj.weight.T, m.up_proj.weight.T], dim=1) for m in self.experts_])
        down = torch.stack([m.down_proj.weight.T for m in self.experts_])
        return gu, down


class MoEStack(nn.Module):
    def __init__(self, make_moe, layers: int = 2, interleave_step: int = 1, hidden: int = 16, inter: int = 24, seed: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(
            make_moe(seed + i) if (i + 1) % interleave_step == 0 else SwiGLU(hidden, inter) for i in range(layers)
        )
        for i, b in enumerate(self.blocks):
            if isinstance(b, SwiGLU):
                _init_(b, seed + 100 + i)
        self.moe_layers = [i for i, b in enumerate(self.blocks) if not isinstance(b, SwiGLU)]

    def forward(self, x_BSH):
        for b in self.blocks:
            x_BSH = x_BSH + b(x_BSH)
        return x_BSH


def export_block(module: nn.Module, path: str | Path, dtype: str = "fp32", hidden: int | None = None) -> Path:
    """Export ``module`` (input x [batch, seq, hidden]) with dynamic batch and sequence; returns the path."""
    path = Path(path)
    module = module.to(DTYPES[dtype]).eval()
    hidden = hidden or module.hidden
    x = torch.randn(2, 3, hidden, dtype=DTYPES[dtype])
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=4096)
    prog = torch.onnx.export(
        module, (x,), dynamo=True, input_names=["x"], output_names=["y"],
        dynamic_shapes=({0: batch, 1: seq},), optimize=True, verbose=False,
    )
    prog.save(str(path))
    return path
