"""int4 weight-only, blockwise along K (group 32, 64 or 128), symmetric or asymmetric.

Symmetric: scale = max|w| / 7 per block, q = round(w / scale) in [-7, 7] (not -8: then a block's
largest value of either sign is exact and every error stays within half a step).
Asymmetric: the block's range [min(w, 0), max(w, 0)] over 16 levels, scale = range / 15, zero
point = round(-min / scale) in [0, 15], q = round(w / scale) + zero point in [0, 15]. Including 0
in the range keeps the zero point inside the levels, so nothing is clipped.
Either way |w - dequantized| <= scale / 2 per element, up to fp32 rounding of the division.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.common import contract
from moec.passes.quantize._base import Format, QTensor, block_view, expand

GROUPS = contract.INT4_GROUPS  # the names the CLI offers (common/contract.py)
DEFAULT_GROUP = 128


def _quantize(w: np.ndarray, axis: int, block: int, symmetric: bool) -> QTensor:
    return quantize_clipped(w, axis, block, symmetric, None)


def quantize_clipped(w: np.ndarray, axis: int, block: int, symmetric: bool, ratio: np.ndarray | None) -> QTensor:
    """Round-to-nearest onto each block's range shrunk by ``ratio`` (one per block, scale's shape;
    None: 1, the full range). Values beyond a shrunk range saturate at the end levels
    (passes/quantize/clip.py chooses the ratios)."""
    w = w.astype(np.float32)
    wb = block_view(w, axis, block)
    k = w.shape[axis]
    if symmetric:
        amax = np.abs(wb).max(axis=axis + 1)
        amax = amax if ratio is None else amax * ratio
        scale = np.where(amax > 0, amax / 7, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / expand(scale, axis, block, k)), -7, 7).astype(np.int8)
        return QTensor(q, scale, None, axis, block)
    lo = np.minimum(wb.min(axis=axis + 1), 0)
    hi = np.maximum(wb.max(axis=axis + 1), 0)
    if ratio is not None:
        lo, hi = lo * ratio, hi * ratio
    scale = np.where(hi > lo, (hi - lo) / 15, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.int8)
    q = np.clip(np.rint(w / expand(scale, axis, block, k)) + expand(zp, axis, block, k), 0, 15).astype(np.int8)
    return QTensor(q, scale, zp, axis, block)


def _error_bound(w: np.ndarray, qt: QTensor) -> np.ndarray:
    return np.broadcast_to(expand(qt.scale, qt.axis, qt.block, w.shape[qt.axis]) / 2, w.shape)


INT4 = Format(
    name="int4", bits=4, granularity="block",
    storage=lambda symmetric: ir.DataType.INT4 if symmetric else ir.DataType.UINT4,
    quantize=_quantize, error_bound=_error_bound, asymmetric=True,
)
