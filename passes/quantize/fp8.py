"""FP8 E4M3 (float8e4m3fn) weights, one scale per output channel.

scale = max|w| / 448 (E4M3's largest finite value) over the channel's K values, q = w / scale
rounded to the nearest E4M3 value (ties to even). E4M3 has 3 mantissa bits: a normal value
(|x| >= 2^-6) is off by at most half a step, 2^-4 of its magnitude; a subnormal one by half the
subnormal step 2^-9. So |w - dequantized| <= scale * max(|w / scale| * 2^-4, 2^-10).
Activations stay in the model's float dtype (weight-only).
"""

from __future__ import annotations

import ml_dtypes  # an onnx-ir dependency: numpy has no float8
import numpy as np
import onnx_ir as ir

from moec.passes.quantize._base import Format, QTensor, block_view, expand

E4M3_MAX = 448.0


def _quantize(w: np.ndarray, axis: int, block: int, symmetric: bool) -> QTensor:
    w = w.astype(np.float32)
    amax = np.abs(block_view(w, axis, block)).max(axis=axis + 1)
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    x = np.clip(w / expand(scale, axis, block, w.shape[axis]), -E4M3_MAX, E4M3_MAX)
    return QTensor(x.astype(ml_dtypes.float8_e4m3fn), scale, None, axis, block)


def _error_bound(w: np.ndarray, qt: QTensor) -> np.ndarray:
    scale = expand(qt.scale, qt.axis, qt.block, w.shape[qt.axis])
    x = np.abs(w.astype(np.float32)) / scale
    return scale * np.maximum(x * 2.0**-4, 2.0**-10)


FP8 = Format(
    name="fp8", bits=8, granularity="channel", storage=lambda symmetric: ir.DataType.FLOAT8E4M3FN,
    quantize=_quantize, error_bound=_error_bound,
)
