"""Checks on the files an ONNX model is made of, shared by every stage that reads one.

``import onnx`` happens inside the functions, so ``moec.common`` stays standard-library only.
"""

from __future__ import annotations

import os
from pathlib import Path


def missing_external_data(onnx_path: str | os.PathLike) -> list[str]:
    """External-data files that ``onnx_path`` references but that are absent or too short.

    Reads only the graph structure (``load_external_data=False``), not the weights.
    """
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    needed: dict[str, int] = {}
    for t in all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        loc = info.get("location", "")
        needed[loc] = max(needed.get(loc, 0), end)
    problems = []
    for loc, end in sorted(needed.items()):
        f = onnx_path.parent / loc
        if not f.is_file():
            problems.append(f"{f} (missing)")
        elif f.stat().st_size < end:
            problems.append(f"{f} (has {f.stat().st_size} bytes, the graph needs {end})")
    return problems


def all_tensors(graph):
    """Every tensor of ``graph``: initializers and constant attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for g in attr.graphs:
                yield from all_tensors(g)
