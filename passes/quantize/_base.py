"""What every quantization format shares: the quantized tensor, its dequantization, and the
format record each format file fills in.

A weight is quantized along its reduction axis (the K of ``x @ w``): a block of ``block``
consecutive elements on that axis shares one scale (and one zero point), every other index has its
own. Per output channel is the block that spans the whole axis. Where ``block`` does not divide K
the last block is shorter (K = 576 in groups of 128: four of 128 and one of 64), as ONNX
DequantizeLinear defines it (scales along the axis: ceil(K / block)); the quantizers compute it as
a block padded with zeros, which changes neither its max|w| nor its [min, 0] .. [0, max] range. That one description is what ONNX
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
    global_scale: np.ndarray | None = None  # fp32 scalar multiplying every block scale (nvfp4); None: 1


def effective_scale(qt: QTensor) -> np.ndarray:
    """The per-block scale in fp32: ``scale`` times ``global_scale`` where there is one (the block
    scales are then E4M3, dequantized in fp32 like the graph's first DequantizeLinear)."""
    scale = qt.scale.astype(np.float32)
    return scale if qt.global_scale is None else scale * np.float32(qt.global_scale)


def expand(per_block: np.ndarray, axis: int, block: int, length: int | None = None) -> np.ndarray:
    """Repeat each block's value over its ``block`` elements on ``axis``, cut to ``length`` (the
    weight's K, when the last block is shorter)."""
    out = np.repeat(per_block, block, axis=axis)
    if length is not None and out.shape[axis] != length:
        out = np.take(out, np.arange(length), axis=axis)
    return out


def num_blocks(k: int, block: int) -> int:
    return -(-k // block)


def dequantize(qt: QTensor) -> np.ndarray:
    """(q - zero_point) * scale in fp32: exactly what DequantizeLinear computes (one rounding)."""
    q, k = qt.q.astype(np.float32), qt.q.shape[qt.axis]
    if qt.zero_point is not None:
        q = q - expand(qt.zero_point, qt.axis, qt.block, k).astype(np.float32)
    return q * expand(effective_scale(qt), qt.axis, qt.block, k)


def block_view(w: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``w`` with ``axis`` split into (blocks, block), a shorter last block padded with zeros:
    reductions over axis + 1 are per block."""
    if w.shape[axis] % block:
        pad = [(0, 0)] * w.ndim
        pad[axis] = (0, num_blocks(w.shape[axis], block) * block - w.shape[axis])
        w = np.pad(w, pad)
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
    fixed_block: int | None = None  # a block size the format defines (nvfp4: 16); --quantize-group does not apply
