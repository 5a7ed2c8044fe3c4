"""GPTQ rounding for int4 (``--quantize-method gptq``, after Frantar et al. 2022), and its use
after AWQ's scales (``awq-gptq``).

Round-to-nearest rounds every weight on its own. GPTQ rounds the input channels (the K of
``x @ w``) one at a time and moves each one's rounding error onto the channels not yet rounded, in
the direction that the calibration activations say cancels it best: it minimises the output error
|| X (w - dq) ||^2 with H = X^T X, one output column at a time, all columns together.
- H is dampened by a multiple of its mean diagonal: K / T for T calibration rows of K channels
  (``hessian``), plus ``DAMP`` (1 %, for the factorisation) . A few hundred rows leave H of rank
  T < K (K = 1536 for SmolLM2's down_proj, T = 512 shipped tokens): with 1 % alone GPTQ cut the
  calibration rows' output error to a tenth of round-to-nearest's but raised it on other text
  (SmolLM2-135M, layer 0 down_proj: 2.2x round-to-nearest's on a held-out text), a fit to those
  rows. Held out, K / T was about the best of the multiples tried (0.3 .. 10: 100 % for the
  gate / up projections' K / T ~ 1, 300 % for down's ~ 3 gave 0.78x round-to-nearest's error on
  average over ten layers); with many more rows than channels it fades to the usual 1 %.
  A channel no calibration row touches (H_kk = 0) is set to 0 in the weight (it never meets a
  non-zero activation).
- With U the upper Cholesky factor of H^-1, rounding channel k leaves the error e = (w_k - dq_k) /
  U_kk, and the channels after k take w_j -= e U_kj. The channels are processed in blocks of one
  quantization group: inside a block the update is applied column by column, the later channels
  get the block's errors at once (the same arithmetic, fewer passes over the weight).
- A group's scale and zero point are chosen when the group is reached, from its weights as the
  earlier groups' errors left them (int4.py's own rule: the group's range on 15 / 16 levels); a
  value later pushed past that range saturates at the end level.
No act-order (channels in their own order), so the groups stay contiguous along K as ONNX
DequantizeLinear's blocks are.

Whose activations: a dense weight's H is the rows its MatMul multiplied on the calibration
prompts (calibrate.py). A routed expert's H comes from the tokens the router sent to that expert
(the score-scaled rows it receives, its down input silu(x w_gate) * (x w_up) on those tokens);
an expert that got fewer than ``MIN_EXPERT_ROWS`` tokens (a few hundred calibration tokens over
many experts leave some with a handful) takes the H of all the experts' routed rows pooled, since
so few rows would fit its rounding to those tokens alone. With awq-gptq the rows are the scaled
ones, x / s, that the scaled weight s * w multiplies (awq.py inserts the 1 / s).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from moec.common.contract import MOEC_DOMAIN, OP_GROUPED_EXPERTS
from moec.passes.quantize._base import QTensor, num_blocks
from moec.passes.quantize.int4 import quantize_clipped

DAMP = 0.01  # of H's mean diagonal
MIN_EXPERT_ROWS = 64  # routed tokens below which an expert's H is the pooled one


def hessian(x_TK: np.ndarray) -> np.ndarray:
    """H = X^T X / T in float64, its diagonal raised by K / T of its mean where it is not 0 (the
    few-rows dampening of the module docstring; the 1 / T keeps sums of many rows in range, GPTQ
    is invariant to H's scale)."""
    x = x_TK.astype(np.float64)
    t, k = max(len(x), 1), x.shape[1]
    h = x.T @ x / t
    diag = np.diag(h).copy()
    alive = diag > 0
    if alive.any():
        h[np.diag_indices(k)] = np.where(alive, diag + (k / t) * diag[alive].mean(), diag)
    return h


def _inverse_cholesky(h_KK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U upper triangular with U^T U = (H + damp I)^-1, and the channels H never saw."""
    h = h_KK.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    damp = DAMP * float(np.mean(np.diag(h)))
    for _ in range(6):  # a degenerate H: more dampening until it factors (1 %, 10 %, ...)
        try:
            inv = np.linalg.inv(h + damp * np.eye(len(h)))
            return np.linalg.cholesky(inv).T, dead
        except np.linalg.LinAlgError:
            damp *= 10
    raise np.linalg.LinAlgError("GPTQ: the calibration Hessian does not factor even with 10^4 % dampening")


def gptq_KN(w_KN: np.ndarray, h_KK: np.ndarray, block: int, symmetric: bool) -> QTensor:
    """GPTQ of one [K, N] weight (K the reduction axis) in groups of ``block`` along K."""
    w = w_KN.astype(np.float64).T.copy()  # [N, K]: a column per input channel
    k = w.shape[1]
    u, dead = _inverse_cholesky(h_KK)
    w[:, dead] = 0.0
    q_NK = np.zeros(w.shape, np.int8)
    blocks = num_blocks(k, block)
    scales = np.zeros((blocks, w.shape[0]), np.float32)
    zeros = None if symmetric else np.zeros((blocks, w.shape[0]), np.int8)
    for b, i1 in enumerate(range(0, k, block)):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2]  # a view: updated in place
        group = quantize_clipped(w1.T.astype(np.float32), 0, i2 - i1, symmetric, None)
        scale = group.scale[0].astype(np.float64)
        zp = 0.0 if symmetric else group.zero_point[0].astype(np.float64)
        scales[b] = group.scale[0]
        if zeros is not None:
            zeros[b] = group.zero_point[0]
        lo, hi = (-7, 7) if symmetric else (0, 15)
        err = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = np.clip(np.rint(col / scale) + zp, lo, hi)
            q_NK[:, i1 + i] = q
            e = (col - (q - zp) * scale) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return QTensor(np.ascontiguousarray(q_NK.T), scales, zeros, 0, block)


def quantize_int4_gptq(w: np.ndarray, axis: int, block: int, symmetric: bool, h: np.ndarray) -> QTensor:
    """GPTQ of a weight with reduction axis ``axis``: [K, N] (axis 0), [N, K] (axis 1, a Gemm's
    transB) or stacked experts [E, K, N] (axis 1) with ``h`` [E, K, K], one H per expert."""
    if w.ndim == 3:
        parts = [gptq_KN(w[e], h[e], block, symmetric) for e in range(w.shape[0])]
        return QTensor(np.stack([p.q for p in parts]), np.stack([p.scale for p in parts]),
                       None if symmetric else np.stack([p.zero_point for p in parts]), 1, block)
    if axis == 0:
        return gptq_KN(w, h, block, symmetric)
    t = gptq_KN(w.T, h, block, symmetric)
    return QTensor(np.ascontiguousarray(t.q.T), np.ascontiguousarray(t.scale.T),
                   None if symmetric else np.ascontiguousarray(t.zero_point.T), 1, block)


def _routed(x_ETK: np.ndarray) -> list[np.ndarray]:
    """Each expert's rows for the tokens the router chose for it (the others are zero rows)."""
    return [x[np.abs(x).max(axis=-1) > 0] for x in x_ETK]


def expert_hessians(x_ETK: np.ndarray, s_EK: np.ndarray | None = None) -> np.ndarray:
    """[E, K, K]: each expert's H from its routed rows (divided by its awq scales ``s_EK``), the
    pooled H where it got fewer than MIN_EXPERT_ROWS tokens (see the module docstring)."""
    rows = _routed(x_ETK)
    if s_EK is not None:
        rows = [x / s[None, :] for x, s in zip(rows, s_EK)]
    pooled = [x for x in rows if len(x)]
    h_pool = hessian(np.concatenate(pooled, axis=0)) if pooled else np.zeros((x_ETK.shape[-1],) * 2)
    return np.stack([hessian(x) if len(x) >= MIN_EXPERT_ROWS else h_pool for x in rows])


def site_hessians(sites, calibration, scales: dict[str, np.ndarray] | None = None,
                  log=None) -> dict[str, Callable[[], np.ndarray]]:
    """{weight name: a function computing its H} for every site calibration saw (computed when the
    weight is quantized, so a large model never holds every H at once). ``scales``: awq's s per
    weight (s_K, or s_EK for the experts' down) when the rows are to be divided by it. A weight
    calibration did not see is left out (it rounds to nearest; the log says so)."""
    stats, scales = calibration.inputs, scales or {}
    out: dict[str, Callable[[], np.ndarray]] = {}
    for site in sites:
        name = site.value.name
        key = name.removesuffix(".T")
        if key not in stats:
            if log is not None:
                log.refuse("gptq", site.uses[0][0], f"{name}: calibration did not see it; rounded to nearest")
            continue
        s = scales.get(name)
        experts = any(n.domain == MOEC_DOMAIN and n.op_type == OP_GROUPED_EXPERTS for n, _ in site.uses)
        if experts:
            s_EK = None if s is None else np.broadcast_to(s, (stats[key].shape[0], s.shape[-1]))
            out[name] = lambda x=stats[key], s_EK=s_EK: expert_hessians(x, s_EK)
        else:
            out[name] = lambda x=stats[key], s=s: hessian(x if s is None else x / s[None, :])
    return out
