"""Per-group clipping search for int4 (``--quantize-method clip``): no data, weights only.

Round-to-nearest spends a block's 15 (16) levels on its full range, so one outlier coarsens the
step of every other value in the block. Shrinking the range by a ratio r < 1 saturates the few
values beyond it and rounds the rest on a finer grid. For each block, independently, this keeps
the ratio of ``CLIP_RATIOS`` with the smallest squared reconstruction error sum (w - dq(q(w)))^2
over the block. The grid starts at 1.0 (round-to-nearest itself) and a ratio replaces it only
where it is strictly better, so no block's error is ever larger than round-to-nearest's.
"""

from __future__ import annotations

import numpy as np

from moec.passes.quantize._base import QTensor, block_view, dequantize
from moec.passes.quantize.int4 import quantize_clipped

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def block_sq_error(w: np.ndarray, qt: QTensor) -> np.ndarray:
    """sum (w - dequantized)^2 per block, in scale's shape."""
    d = w.astype(np.float32) - dequantize(qt)
    return np.square(block_view(d, qt.axis, qt.block)).sum(axis=qt.axis + 1)


def quantize_int4_clip(w: np.ndarray, axis: int, block: int, symmetric: bool,
                       ratios: tuple[float, ...] = CLIP_RATIOS) -> QTensor:
    """int4 blocks with each block's range shrunk by its best ratio of ``ratios`` (1.0 first)."""
    if not ratios or ratios[0] != 1.0:
        raise ValueError("clip ratios start at 1.0 (round-to-nearest)")
    w = w.astype(np.float32)
    best = quantize_clipped(w, axis, block, symmetric, None)
    best_err = block_sq_error(w, best)
    chosen = np.ones_like(best.scale)
    for r in ratios[1:]:
        qt = quantize_clipped(w, axis, block, symmetric, np.full_like(best.scale, r))
        better = block_sq_error(w, qt) < best_err
        if better.any():
            chosen = np.where(better, np.float32(r), chosen)
            best_err = np.where(better, block_sq_error(w, qt), best_err)
    return quantize_clipped(w, axis, block, symmetric, chosen)
