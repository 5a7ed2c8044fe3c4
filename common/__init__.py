"""Pieces every stage shares: the project's error type, atomic artifact writes, and the
contracts between stages (ONNX I/O names, moec's ONNX domain, the TensorRT plugin identity).

This package imports nothing heavier than the standard library, so every stage (including a
runtime host without torch) can use it.
"""

from moec.common.errors import MoecError

__all__ = ["MoecError"]
