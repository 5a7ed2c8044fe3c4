"""Checks on the files an ONNX model is made of, shared by every stage that reads one.

``import onnx`` happens inside the functions, so ``moec.common`` stays standard-library only.
"""

from __future__ import annotations

import os
from pathlib import Path

from moec.common.confine import confined_path
from moec.common.errors import MoecError

_REDO = "pass the .onnx written by `moec export` or `moec optimize` (re-export it if it was cut short)"


def load_graph_structure(onnx_path: str | os.PathLike):
    """The ModelProto of ``onnx_path`` without its external weights, or a MoecError naming the file
    when it is empty, truncated or not ONNX at all. An empty file parses as an empty ModelProto
    (protobuf's default message), so "it parsed" is not enough: a model has a graph with outputs."""
    import onnx
    from google.protobuf.message import DecodeError

    onnx_path = Path(onnx_path)
    try:
        size = onnx_path.stat().st_size
    except OSError as e:
        raise MoecError(f"cannot read {onnx_path}: {e.strerror or e}; {_REDO}") from None
    if size == 0:
        raise MoecError(f"{onnx_path} is empty (0 bytes), not an ONNX model; {_REDO}")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MoecError(f"{onnx_path} is not a readable ONNX model (truncated or another format: {e}); {_REDO}") from None
    except OSError as e:
        raise MoecError(f"cannot read {onnx_path}: {e.strerror or e}; {_REDO}") from None
    if model.ir_version <= 0 or not model.graph.output or not model.opset_import:
        raise MoecError(f"{onnx_path} is not a complete ONNX model (no ir_version, opset or graph outputs: "
                        f"truncated or another format); {_REDO}")
    return model


def external_data_needs(onnx_path: str | os.PathLike, model=None) -> dict[Path, int]:
    """Each external-data file the graph references -> the bytes it must hold. Every location is
    checked to lie inside the model's folder (``moec.common.confine``) before any file is opened."""
    import onnx

    onnx_path = Path(onnx_path)
    model = load_graph_structure(onnx_path) if model is None else model
    needed: dict[Path, int] = {}
    for t in all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        try:
            end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        except ValueError:
            raise MoecError(f"{onnx_path}: tensor {t.name!r} has a non-numeric external-data offset or length; "
                            "re-export the model") from None
        f = confined_path(onnx_path.parent, info.get("location", ""), f"{onnx_path}: tensor {t.name!r}'s external data",
                          "keep the .data file beside the .onnx under the name the export wrote, or re-export")
        needed[f] = max(needed.get(f, 0), end)
    return needed


def missing_external_data(onnx_path: str | os.PathLike) -> list[str]:
    """External-data files that ``onnx_path`` references but that are absent or too short.

    Reads only the graph structure (``load_external_data=False``), not the weights. A location
    outside the model's folder, or a file that is not an ONNX model, is a MoecError.
    """
    problems = []
    for f, end in sorted(external_data_needs(onnx_path).items()):
        if not f.is_file():
            problems.append(f"{f} (missing)")
        elif f.stat().st_size < end:
            problems.append(f"{f} (has {f.stat().st_size} bytes, the graph needs {end})")
    return problems


def require_external_data(onnx_path: str | os.PathLike) -> None:
    """MoecError unless every external-data file of ``onnx_path`` is inside its folder and complete."""
    problems = missing_external_data(onnx_path)
    if problems:
        raise MoecError(
            f"{onnx_path} keeps its weights in external data that is not usable: {'; '.join(problems)}. "
            "Keep the complete .data file beside the .onnx (same name as when exported), or re-export."
        )


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


def require_moec_io(onnx_path: str | os.PathLike, model, num_layers: int, image_features: bool = False) -> None:
    """MoecError unless the graph has a moec export's inputs and outputs for ``num_layers`` layers
    (``moec.common.contract``): a graph from elsewhere, given with a moec sidecar, is named as such
    before TensorRT or a profile lookup meets tensors it does not know."""
    from moec.common import contract

    want_in, want_out = contract.io_names(num_layers, image_features)
    have_in = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    have_out = {o.name for o in model.graph.output}
    missing = [n for n in want_in if n not in have_in] + [n for n in want_out if n not in have_out]
    extra = sorted(have_in - set(want_in))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:4])}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")]
                 if missing else []) + ([f"unexpected inputs {', '.join(extra[:4])}"] if extra else [])
        raise MoecError(f"{onnx_path} is not a moec export for its metadata ({num_layers} layers): {'; '.join(parts)}; "
                        "export the checkpoint with `moec export` (and optimize it with `moec optimize`)")
