"""Activation-aware int4 scaling (``--quantize-method awq``, after AWQ, Lin et al. 2023).

A weight's input channels do not matter equally: the ones that meet large activations carry
most of the output. Per input channel k, s_k = mean|x_k| ** alpha (normalised to a geometric mean
of 1), the weight is quantized as w * s (those rows get finer steps relative to their size) and the
input is divided by s, so x @ w = (x / s) @ (s * w) before rounding. alpha is searched on
``AWQ_ALPHAS`` per weight, minimising || x @ w - (x / s) @ dq(q(s * w)) ||^2 on the calibration
rows (calibrate.py); alpha = 0 (s = 1, no scaling) is in the grid, so the chosen scales never do
worse than none on those rows. The search rounds to nearest (AWQ's choice); the weights are then
quantized with the clipping search (clip.py) weighted by mean (x_k / s_k)^2, the input channel's
calibrated energy after scaling (an unweighted search minimises the weight's error, which here
often made the output's error larger than round-to-nearest's).

Where x / s goes:
- MatMul / Gemm weights (dense MLPs, shared expert, attention): a Mul by 1 / s on that node's
  activation input (one elementwise op; the DequantizeLinear -> MatMul the lowerings look for is
  untouched).
- The routed experts' gate_up (w_EHI2): every expert reads the same input x_TH, so one s over H
  is shared by all experts and applied as a Mul on the fused op's input. Its statistics pool the
  router's chosen tokens of every expert (the score-scaled rows the experts actually receive), and
  the loss sums over experts, each on its own routed tokens.
- The routed experts' down (w_EIH): its input lives inside the fused op, but it is
  silu(x w_gate) * (x w_up), linear in the up projection, so 1 / s_e folds exactly into expert e's
  up columns. s_e is per expert, from the tokens the router sent to e. The fold happens before
  gate_up is searched and quantized (scaling a column scales its K-blocks uniformly).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.common.contract import MOEC_DOMAIN, OP_GROUPED_EXPERTS
from moec.passes.quantize._base import dequantize
from moec.passes.quantize.int4 import quantize_clipped

AWQ_ALPHAS = tuple(i / 10 for i in range(11))
MAX_ROWS = 256  # calibration rows per weight in the search (the loss is a sum over them)


def channel_scales(mean_abs_K: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(mean_abs_K.astype(np.float64), 1e-8) ** alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def _rtn(w: np.ndarray, axis: int, block: int, symmetric: bool) -> np.ndarray:
    return dequantize(quantize_clipped(w, axis, block, symmetric, None))


def search_alpha(w_KN: np.ndarray, x_TK: np.ndarray, mean_abs_K: np.ndarray, block: int, symmetric: bool,
                 x_rows: list[np.ndarray] | None = None) -> tuple[np.ndarray, float, float, float]:
    """(s_K, alpha, loss at alpha 0, loss at alpha). ``w_KN`` may be stacked [E, K, N]; then
    ``x_rows`` holds each expert's own rows and the loss sums over experts."""
    stacked = w_KN.ndim == 3
    rows = x_rows if stacked else [x_TK]
    ws = list(w_KN) if stacked else [w_KN]
    refs = [x @ w for x, w in zip(rows, ws)]
    best = None
    for alpha in AWQ_ALPHAS:
        s = channel_scales(mean_abs_K, alpha)
        wq = _rtn(w_KN * (s[:, None]), w_KN.ndim - 2, block, symmetric) / s[:, None]
        wqs = list(wq) if stacked else [wq]
        loss = float(sum(np.square(x @ q - r).sum() for x, q, r in zip(rows, wqs, refs)))
        if alpha == 0:
            base = loss
        if best is None or loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], base, best[2]


def _sample(x: np.ndarray) -> np.ndarray:
    if len(x) <= MAX_ROWS:
        return x
    return x[np.linspace(0, len(x) - 1, MAX_ROWS).astype(int)]


def _routed_rows(x_ETK: np.ndarray) -> list[np.ndarray]:
    """Each expert's rows for the tokens the router chose for it (the others are zero rows)."""
    return [_sample(x[np.abs(x).max(axis=-1) > 0]) for x in x_ETK]


def _set_weight(value: ir.Value, array: np.ndarray) -> None:
    dtype = value.const_value.numpy().dtype
    value.const_value = ir.tensor(np.ascontiguousarray(array.astype(dtype)), name=value.name)


def _insert_input_mul(graph: ir.Graph, node: ir.Node, inv_s: np.ndarray, np_dtype, name: str) -> None:
    """node.input[0] := Mul(node.input[0], inv_s)."""
    x = node.inputs[0]
    tensor = ir.tensor(np.ascontiguousarray(inv_s.astype(np_dtype)))
    base = f"{name}.awq{sum(1 for v in graph.initializers if v.startswith(name + '.awq'))}"
    const = ir.Value(name=f"{base}.inv_scale", shape=ir.Shape(inv_s.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(const)
    mul = ir.Node("", "Mul", [x, const], name=f"{base}/scale_input")
    mul.outputs[0].name, mul.outputs[0].dtype, mul.outputs[0].shape = f"{base}.input", x.dtype, x.shape
    graph.insert_before(node, mul)
    node.replace_input_with(0, mul.outputs[0])


def apply_awq(model: ir.Model, sites, spec, calibration,
              log=None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scale the weights of ``sites`` in place (float, before quantization) and insert the
    compensating Muls; returns ({weight name: importance broadcast on the weight} for the clipping
    search, {weight name: s_K, or s_EK for the experts' down} for awq-gptq's Hessians of x / s).
    A weight calibration did not see (renamed by a rewrite) stays unscaled, and the log says so."""
    graph = model.graph
    importance: dict[str, np.ndarray] = {}
    scales: dict[str, np.ndarray] = {}
    by_name = {s.value.name: s for s in sites}
    stats = calibration.inputs
    experts_nodes = {n for s in sites if s.kind == "experts" for n, _ in s.uses
                     if n.domain == MOEC_DOMAIN and n.op_type == OP_GROUPED_EXPERTS}
    done: set[str] = set()
    for node in sorted(experts_nodes, key=lambda n: n.name or ""):
        gate_up, down = node.inputs[3], node.inputs[4]
        w_gu = gate_up.const_value.numpy().astype(np.float32)  # [E, H, 2I]
        inter = w_gu.shape[-1] // 2
        if down.name in by_name and down.name in stats:
            w_d = down.const_value.numpy().astype(np.float32)  # [E, I, H]
            rows = _routed_rows(stats[down.name])
            h_EI1 = np.ones((len(rows), inter, 1), np.float32)
            s_EI = np.ones((len(rows), inter), np.float32)
            for e, x in enumerate(rows):
                if not len(x):
                    continue  # no calibration token reached expert e: left unscaled
                s, _, _, _ = search_alpha(w_d[e], x, np.abs(x).mean(0), spec.block_for(inter), spec.symmetric)
                w_d[e] *= s[:, None]
                w_gu[e, :, inter:] /= s[None, :]
                h_EI1[e, :, 0] = np.square(x / s).mean(0)
                s_EI[e] = s
            _set_weight(down, w_d)
            importance[down.name] = h_EI1
            scales[down.name] = s_EI
            done.add(down.name)
        if gate_up.name in by_name and gate_up.name in stats:
            rows = _routed_rows(stats[gate_up.name])
            pooled = np.concatenate([x for x in rows if len(x)], axis=0)
            k = w_gu.shape[1]
            s, _, _, _ = search_alpha(w_gu, pooled, np.abs(pooled).mean(0), spec.block_for(k), spec.symmetric,
                                      x_rows=[x if len(x) else np.zeros((1, k), np.float32) for x in rows])
            w_gu *= s[None, :, None]
            _insert_input_mul(graph, node, 1 / s, gate_up.const_value.numpy().dtype, gate_up.name)
            importance[gate_up.name] = np.square(pooled / s).mean(0)[None, :, None]
            scales[gate_up.name] = s
            done.add(gate_up.name)
        _set_weight(gate_up, w_gu)
    for site in sites:
        name = site.value.name
        key = name.removesuffix(".T")
        if name in done or site.kind == "experts":
            continue
        if key not in stats:
            if log is not None:
                log.refuse("awq", site.uses[0][0], f"{name}: calibration did not see it; quantized without scales")
            continue
        w = site.value.const_value.numpy().astype(np.float32)
        w_KN = w if site.axis == 0 else w.T
        x = _sample(stats[key])
        s, _, _, _ = search_alpha(w_KN, x, np.abs(stats[key]).mean(0), spec.block_for(w_KN.shape[0]),
                                  spec.symmetric)
        _set_weight(site.value, w * (s[:, None] if site.axis == 0 else s[None, :]))
        for use, _ in site.uses:
            _insert_input_mul(graph, use, 1 / s, site.value.const_value.numpy().dtype, name)
        h = np.square(stats[key] / s).mean(0)
        importance[name] = h[:, None] if site.axis == 0 else h[None, :]
        scales[name] = s
    return importance, scales
