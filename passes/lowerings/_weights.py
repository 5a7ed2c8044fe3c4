"""Re-laid-out expert weights for lowerings, computed lazily when the model is written.

The source initializer may live in an external-data file; a ``LazyTensor`` reads it only while
the new file is written, so a lowering never holds a second full copy of the experts in memory
(and an unused original is dropped by dead-node removal before saving).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from moec.passes.fusions._graph import Refuse, is_initializer


def derived(graph: ir.Graph, source: ir.Value, name: str, shape: tuple[int, ...],
            fn: Callable[[np.ndarray], np.ndarray], dtype: ir.DataType | None = None) -> ir.Value:
    if not is_initializer(source):
        raise Refuse(f"expert weight {source.name!r} is not a constant initializer")
    src = source.const_value
    full = f"{source.name}.{name}"
    if full in graph.initializers:
        return graph.initializers[full]

    dtype = dtype or src.dtype  # a re-packing (quantized weights) may change it

    def compute():
        return ir.tensor(np.ascontiguousarray(fn(src.numpy())), dtype=dtype)

    tensor = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape))
    value = ir.Value(name=full, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def dims(pair) -> tuple[int, int, int]:
    """(E, H, I) of a pair's expert weights."""
    E, H, I2 = (int(d) for d in pair.w_gate_up_EHI2.shape)
    return E, H, I2 // 2
