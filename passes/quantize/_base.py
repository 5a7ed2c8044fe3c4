"""What every quantization format shares: the quantized tensor, its dequantization, and the
format record each format file fills in.

A weight is quantized along its reduction axis (the K of ``x @ w``): a block of ``block``
consecutive elements on that axis shares one scale (and one zero point), every other index has its
own. Per output channel is the block that spans the whole axis. That one description is what ONNX
DequantizeLinear (opset 21, ``axis`` + ``block_size``) and the fused ops (QMoE, MatMulNBits) take,
so every lowering reads the same ``QTensor``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized weight: ``w ~= (q - zero_point) * scale``, scales repeated ``block`` times
    along ``axis``."""

    q: np.ndarray  # integer values in the format's range (int8 array for int4), or float8 (ml_dtypes)
    scale: np.ndarray  # float32, w's shape with axis shortened to w.shape[axis] // block
    zero_point: np.ndarray | None  # integer, scale's shape; None: 0
    axis: int
    block: int


def expand(per_block: np.ndarray, axis: int, block: int) -> np.ndarray:
    """Repeat each block's value over its ``block`` elements on ``axis``."""
    return np.repeat(per_block, block, axis=axis)


def dequantize(qt: QTensor) -> np.ndarray:
    """(q - zero_point) * scale in fp32: exactly what DequantizeLinear computes (one rounding)."""
    q = qt.q.astype(np.float32)
    if qt.zero_point is not None:
        q = q - expand(qt.zero_point, qt.axis, qt.block).astype(np.float32)
    return q * expand(qt.scale, qt.axis, qt.block)


def block_view(w: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``w`` with ``axis`` split into (blocks, block): reductions over axis + 1 are per block."""
    shape = list(w.shape)
    shape[axis : axis + 1] = [shape[axis] // block, block]
    return w.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Format:
    """One quantization format, as data: what it stores, how finely it scales, how to quantize
    and how far a dequantized value may lie from the original.

    ``quantize(w, axis, block, symmetric)`` takes the block already resolved (the group size for
    blockwise formats, ``w.shape[axis]`` per channel); ``error_bound(w, qt)`` is the largest
    |w - dequantize(qt)| the format allows for each element (round-to-nearest: half a step)."""

    name: str
    bits: int
    granularity: str  # "block": --quantize-group along K | "channel": one scale per output channel
    storage: Callable[[bool], ir.DataType]  # the ONNX dtype of q, given symmetric
    quantize: Callable[[np.ndarray, int, int, bool], QTensor]
    error_bound: Callable[[np.ndarray, QTensor], np.ndarray]
    asymmetric: bool = False  # whether an asymmetric (zero point) variant exists
