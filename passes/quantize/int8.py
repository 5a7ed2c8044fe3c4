"""int8 weight-only, one symmetric scale per output channel.

scale = max|w| / 127 over the channel's K values, q = round(w / scale) in [-127, 127] (not -128,
for the same reason as int4's -7: the largest value of either sign stays exact), so
|w - dequantized| <= scale / 2 per element, up to fp32 rounding of the division.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.passes.quantize._base import Format, QTensor, block_view, expand


def _quantize(w: np.ndarray, axis: int, block: int, symmetric: bool) -> QTensor:
    w = w.astype(np.float32)
    amax = np.abs(block_view(w, axis, block)).max(axis=axis + 1)
    scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / expand(scale, axis, block, w.shape[axis])), -127, 127).astype(np.int8)
    return QTensor(q, scale, None, axis, block)


def _error_bound(w: np.ndarray, qt: QTensor) -> np.ndarray:
    return np.broadcast_to(expand(qt.scale, qt.axis, qt.block, w.shape[qt.axis]) / 2, w.shape)


INT8 = Format(
    name="int8", bits=8, granularity="channel", storage=lambda symmetric: ir.DataType.INT8,
    quantize=_quantize, error_bound=_error_bound,
)
