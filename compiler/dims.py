"""The largest value of a dynamic dimension (batch, sequence, past length) an artifact may declare.

TensorRT's optimization profiles hold int32 dimensions: a larger ``--max-batch`` ends in
TensorRT's own "Shape provided for max is inconsistent" RuntimeError, after the network was
parsed. Exported graphs declare the same dimensions to every backend, so export and build share
the bound and check it before any work, naming the option.
"""

from __future__ import annotations

from moec.common.errors import MoecError

MAX_DIM = (1 << 31) - 1  # TensorRT's Dims are int32


def check_dim(option: str, value: int | None) -> None:
    if value is not None and value > MAX_DIM:
        raise MoecError(f"{option} {value} is larger than any dimension an engine can have ({MAX_DIM}, TensorRT's "
                        "int32 shapes); give a smaller value")
