"""NVFP4 weight-only: E2M1 values in blocks of 16 along K, one E4M3 scale per block and one fp32
scale per tensor, as NVIDIA's NVFP4 defines it.

global = amax(|w|) / (6 * 448) over the whole tensor (6: E2M1's largest value, 448: E4M3's), so
the largest block's scale is exactly 448. block = amax_block / 6 / global, rounded to the nearest
E4M3 value. The effective scale of a block is s = e4m3(block) * global (fp32), and
q = w / s rounded to the nearest E2M1 value (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to even),
saturating at ±6.

The E2M1 grid's step is 0.5 below 2, 1 from 2 to 4 and 2 from 4 to 6, so round-to-nearest is off
by at most s times half the step at |w| / s. The block scale's E4M3 rounding may leave |w| / s a
little above 6 (up to 6 * (1 + 2^-4) for a normal E4M3 scale), which saturates at 6: still within
the top half step (1). A block far smaller than the tensor's largest (amax_block < 2^-6 / 448 of
it) gets a subnormal or zero E4M3 scale; such a block is bounded by its saturation error, or by
|w| itself when its scale rounds to 0 (it then dequantizes to 0).

The QTensor holds q as ml_dtypes.float4_e2m1fn, ``scale`` the E4M3 block scales and
``global_scale`` the fp32 scalar; ``_base.dequantize`` multiplies the two scales in fp32 first,
like the graph's DequantizeLinear(block scales, global scale).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from moec.passes.quantize._base import Format, QTensor, block_view, effective_scale, expand

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def global_scale(w: np.ndarray) -> np.float32:
    """amax(|w|) / (6 * 448) in fp32 (1 for an all-zero tensor: every block scale is then 0)."""
    amax = np.float32(np.abs(w).max()) if w.size else np.float32(0)
    return np.float32(amax / np.float32(E2M1_MAX * E4M3_MAX)) if amax > 0 else np.float32(1.0)


def _quantize(w: np.ndarray, axis: int, block: int, symmetric: bool) -> QTensor:
    w = w.astype(np.float32)
    g = global_scale(w)
    amax = np.abs(block_view(w, axis, block)).max(axis=axis + 1)
    bs = np.clip(amax / np.float32(E2M1_MAX) / g, 0, E4M3_MAX).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    s = expand(bs.astype(np.float32) * g, axis, block, w.shape[axis])
    x = np.divide(w, s, out=np.zeros_like(w), where=s > 0)
    q = np.clip(x, -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn)
    return QTensor(q, bs, None, axis, block, global_scale=np.array(g, np.float32))


def half_step(x: np.ndarray) -> np.ndarray:
    """Half the E2M1 grid step around |x| (x already divided by the block's scale)."""
    x = np.abs(x)
    return np.where(x < 2, 0.25, np.where(x < 4, 0.5, 1.0)).astype(np.float32)


def _error_bound(w: np.ndarray, qt: QTensor) -> np.ndarray:
    w = w.astype(np.float32)
    s = expand(effective_scale(qt), qt.axis, qt.block, w.shape[qt.axis])
    x = np.abs(np.divide(w, s, out=np.zeros_like(w), where=s > 0))
    return np.where(s > 0, s * np.maximum(half_step(x), x - E2M1_MAX), np.abs(w))


NVFP4 = Format(
    name="nvfp4", bits=4, granularity="block", storage=lambda symmetric: ir.DataType.FLOAT4E2M1,
    quantize=_quantize, error_bound=_error_bound, fixed_block=BLOCK,
)
