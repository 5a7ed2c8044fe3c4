"""Output memory a TensorRT step writes into, allocated once at the profiles' largest shapes and
viewed at each step's shape, so a step allocates nothing (moec.runtime.trt_backend,
moec.runtime.trt_chain).

KV presents ping-pong between two buffers: a step reads past from one and TensorRT writes present
(past + new) into the other, never into the memory it is reading.
"""

from __future__ import annotations

import math
from typing import Any


def flat_buffer(numel: int, dtype, device, zeros: bool = False):
    """A flat buffer of ``numel`` elements (zeros where stale memory could reach a result: a ring's
    unwritten slots are masked, but NaN in fresh memory would survive a mask)."""
    import torch

    return (torch.zeros if zeros else torch.empty)(numel, dtype=dtype, device=device)


def view_of(flat, shape: tuple[int, ...]):
    """The first prod(``shape``) elements of ``flat`` viewed as ``shape`` (no copy)."""
    return flat[: math.prod(shape)].view(*shape)


def other_buffer(pair: tuple[Any, Any], view):
    """Of a ping-pong ``pair``, the buffer ``view`` (the current past) does not occupy."""
    a, b = pair
    return b if view.data_ptr() == a.data_ptr() else a
