"""From an ONNX file to a TensorRT network: the logger, the parser, external data, plugins, and what the network holds."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

import onnx
from moec.common import contract
from moec.common.errors import MoecError
from moec.common.onnx_files import (
    require_external_data,
)
from moec.runtime.trt_backend import (
    TrtFlavour,
)


# --- The TensorRT logger: keep TensorRT's messages so errors can quote them ------------------------
def make_logger(trt):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))

        def mark(self) -> int:
            return len(self.messages)

        def since(self, mark: int, max_severity) -> list[str]:
            # Severity enum: lower is worse (INTERNAL_ERROR 0, ERROR 1, WARNING 2).
            return [m for s, m in self.messages[mark:] if int(s) <= int(max_severity)]

    return _Logger()


def _errors(logger, mark: int, trt) -> str:
    # A CPU-only host logs CUDA probe failures (cudaError 35) on every call; they never explain a
    # build failure, so leave them out of the message.
    msgs = [m for m in logger.since(mark, trt.ILogger.Severity.ERROR) if "cudaError 35" not in m]
    # Myelin dumps whole tensors into its messages; the first 600 characters carry the reason.
    return "\n  ".join(m if len(m) <= 600 else m[:600] + " ..." for m in msgs[-6:]) or "(TensorRT logged no error)"


# --- Step 1: network from ONNX --------------------------------------------------------------------
def network_from_onnx(flavour: TrtFlavour, onnx_path: Path, logger, proto=None):
    """Parse ``onnx_path`` into a strongly typed network (precision is the graph's own dtypes);
    ``proto``: a graph cut from it (a layer range), whose external weights stay in its .data file.
    Returns (builder, network, keep): ``keep`` holds the parser and the memory-mapped weights
    (moec.compiler.build.stream), which the network points into until the build is done."""
    trt = flavour.trt
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    weights = None
    if hasattr(parser, "load_model_proto"):
        from moec.compiler.build.stream import load_external_initializers

        proto = proto if proto is not None else onnx.load(str(onnx_path), load_external_data=False)
        ok = parser.load_model_proto(proto.SerializeToString(), str(onnx_path))
        if ok:
            weights = load_external_initializers(parser, proto, onnx_path)
            ok = parser.parse_model_proto()
    elif proto is not None:
        raise MoecError(f"{flavour.name} {flavour.version} has no OnnxParser.load_model_proto, which layer-range "
                        "engines need: upgrade it, or build without --layers-per-engine")
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        lines = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            lines.append(f"node {e.node_name() or '#' + str(e.node())} (op {e.node_operator()}): {e.desc()}")
        raise MoecError(
            f"{flavour.name} cannot parse {onnx_path}:\n  " + "\n  ".join(lines)
            + "\nrewrite the graph for this target (moec optimize --target trt:<arch> or trt-rtx:<arch>, "
            "with --moe-lowering hybrid (the default) or dense)"
        )
    return builder, network, (parser, weights)


def check_external_data(onnx_path: Path) -> None:
    """A missing or truncated .data file (or one outside the model's folder), named, before
    TensorRT's parser reports it as an unimportable initializer (which reads like a graph problem)
    or reads whatever file the graph points at."""
    require_external_data(onnx_path)


# --- What the manifest records ---------------------------------------------------------------------
def plugins_needed(model: onnx.ModelProto) -> list[dict[str, str]]:
    found = {}
    for node in _all_nodes(model.graph):
        if node.op_type == contract.PLUGIN_NAME:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            version = attrs.get("plugin_version", contract.PLUGIN_VERSION)
            namespace = attrs.get("plugin_namespace", node.domain or contract.PLUGIN_NAMESPACE)
            version = version.decode() if isinstance(version, bytes) else str(version)
            namespace = namespace.decode() if isinstance(namespace, bytes) else str(namespace)
            found[(node.op_type, version, namespace)] = {"name": node.op_type, "version": version, "namespace": namespace}
    return list(found.values())


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


_ONNX_DTYPE_NAMES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
                     onnx.TensorProto.FLOAT8E4M3FN: "fp8", onnx.TensorProto.INT8: "int8"}


def graph_precision(model: onnx.ModelProto) -> str:
    """The float dtype holding most weight elements; a strongly typed build keeps it."""
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        name = _ONNX_DTYPE_NAMES.get(t.data_type)
        if name:
            n = 1
            for d in t.dims:
                n *= d
            counts[name] = counts.get(name, 0) + n
    return max(counts, key=counts.get) if counts else "fp32"


def network_io(network) -> dict[str, list[dict[str, Any]]]:
    def desc(t):
        return {"name": t.name, "dtype": str(t.dtype).rsplit(".", 1)[-1].lower(), "shape": list(t.shape)}

    return {"inputs": [desc(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [desc(network.get_output(i)) for i in range(network.num_outputs)]}


def network_layers(network) -> dict[str, Any]:
    by_type: dict[str, int] = {}
    for i in range(network.num_layers):
        kind = str(network.get_layer(i).type).rsplit(".", 1)[-1]
        by_type[kind] = by_type.get(kind, 0) + 1
    return {"count": network.num_layers, "by_type": dict(sorted(by_type.items()))}


def _register_moec_plugin(flavour: TrtFlavour, notes: list[str]) -> None:
    """Make moec's MoE plugin known to TensorRT's registry, so the parser can resolve the node.
    moec.runtime.trt_plugin raises a MoecError where the flavour cannot host it."""
    try:
        module = importlib.import_module("moec.runtime.trt_plugin")
    except ImportError as e:
        notes.append(f"moec.runtime.trt_plugin is not importable ({e}); the parser will look the plugin up as registered")
        return
    module.register_plugin(flavour.trt)
