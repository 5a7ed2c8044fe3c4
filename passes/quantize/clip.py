"""Per-group clipping search for int4 (``--quantize-method clip``): no data, weights only.

Round-to-nearest spends a block's 15 (16) levels on its full range, so one outlier coarsens the
step of every other value in the block. Shrinking the range by a ratio r < 1 saturates the few
values beyond it and rounds the rest on a finer grid. For each block, independently, this keeps
the ratio of ``CLIP_RATIOS`` with the smallest squared reconstruction error sum (w - dq(q(w)))^2
over the block. The grid starts at 1.0 (round-to-nearest itself) and a ratio replaces it only
where it is strictly better, so no block's error is ever larger than round-to-nearest's.

With ``importance`` (awq.py: the calibrated mean x_k^2 of the input channel each element meets,
broadcast on w) the error is weighted, sum h_k (w - dq)^2, the diagonal part of the output error
||x @ (w - dq)||^2: the search then trades error away from the channels that large activations
amplify. Round-to-nearest is still in the grid, so the weighted error never grows either.
"""

from __future__ import annotations

import numpy as np

from moec.passes.quantize._base import QTensor, block_view, dequantize
from moec.passes.quantize.int4 import quantize_clipped

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def block_sq_error(w: np.ndarray, qt: QTensor, importance: np.ndarray | None = None) -> np.ndarray:
    """sum (w - dequantized)^2 per block (weighted by ``importance`` where given), in scale's shape."""
    d = np.square(w.astype(np.float32) - dequantize(qt))
    if importance is not None:
        d = d * importance
    return block_view(d, qt.axis, qt.block).sum(axis=qt.axis + 1)


def quantize_int4_clip(w: np.ndarray, axis: int, block: int, symmetric: bool,
                       ratios: tuple[float, ...] = CLIP_RATIOS, importance: np.ndarray | None = None) -> QTensor:
    """int4 blocks with each block's range shrunk by its best ratio of ``ratios`` (1.0 first)."""
    if not ratios or ratios[0] != 1.0:
        raise ValueError("clip ratios start at 1.0 (round-to-nearest)")
    w = w.astype(np.float32)
    best = quantize_clipped(w, axis, block, symmetric, None)
    best_err = block_sq_error(w, best, importance)
    chosen = np.ones_like(best.scale)
    for r in ratios[1:]:
        qt = quantize_clipped(w, axis, block, symmetric, np.full_like(best.scale, r))
        err = block_sq_error(w, qt, importance)
        better = err < best_err
        if better.any():
            chosen = np.where(better, np.float32(r), chosen)
            best_err = np.where(better, err, best_err)
    return quantize_clipped(w, axis, block, symmetric, chosen)
