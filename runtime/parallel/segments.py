"""A rank graph cut into ONNX Runtime segments at its DistCollective nodes.

ONNX Runtime has no kernel for TensorRT's DistCollective, and a stand-in custom op would need a
compiled ORT extension; so the graph is cut instead. Every node gets a stage: the highest stage
among the values it reads, where a collective's output is one stage above its input. Stage k's
nodes form segment k, one InferenceSession; between segments k and k+1 the runner executes the
collectives whose input is of stage k (torch.distributed, or any callable), feeding their
outputs to the later segments. A collective is therefore a point where every rank's segment
ends, which is exactly where the ranks must meet anyway.

Values that cross a segment boundary (the residual stream, the KV cache presents, the mask) go
through host memory as numpy arrays. Initializers stay with the segment that reads them; a graph
with external data keeps it there: each segment's session reads the rank's .data file in place
(ORT's external-initializers folder option), so no weight is copied.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from moec.common import contract
from moec.common.errors import MoecError


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    input: str
    output: str
    operation: str  # "all_reduce"
    reduce_op: str  # "sum"
    group: tuple[int, ...] | None  # None: all ranks


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _subgraph_reads(node) -> set[str]:
    """Outer-scope names the node's subgraphs (If/Loop bodies) read."""
    reads: set[str] = set()
    for a in node.attribute:
        graphs = list(a.graphs) + ([a.g] if a.HasField("g") else [])
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                defined |= set(n.output)
            for n in g.node:
                reads |= {i for i in n.input if i and i not in defined}
                reads |= _subgraph_reads(n) - defined
    return reads


def _reads(node) -> list[str]:
    return [i for i in node.input if i] + sorted(_subgraph_reads(node))


class SegmentedGraph:
    """One rank graph as ORT sessions between collectives; ``run`` takes the graph's feeds and a
    ``collective(c, array) -> array`` callable and returns the graph outputs by name."""

    def __init__(self, path: Path, intra_op_threads: int | None = None):
        import onnx

        self.path = Path(path)
        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception as e:
            raise MoecError(f"{self.path}: not a readable ONNX model ({e})") from e
        self.model = model
        self.collectives: list[list[Collective]] = []
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        stage: dict[str, int] = {i.name: 0 for i in graph.input}
        stage.update({n: 0 for n in inits})
        node_stage = []
        boundary: dict[int, list[Collective]] = {}
        for node in graph.node:
            s = max([stage.get(i, 0) for i in _reads(node) if i not in inits] or [0])
            if node.op_type == contract.DIST_COLLECTIVE and node.domain in ("", "ai.onnx"):
                groups = _attr(node, "groups")
                c = Collective(node.name, node.input[0], node.output[0], _attr(node, "collective_operation"),
                               _attr(node, "reduce_op", "none"), tuple(groups) if groups else None)
                if c.operation != "all_reduce" or c.reduce_op != "sum":
                    raise MoecError(f"{self.path}: DistCollective {node.name!r} is {c.operation}/{c.reduce_op}; "
                                    "the ONNX Runtime path runs sum all-reduces only")
                boundary.setdefault(s, []).append(c)
                stage[node.output[0]] = s + 1
                node_stage.append(None)
                continue
            for o in node.output:
                stage[o] = s
            node_stage.append(s)
        n_segments = max([s for s in node_stage if s is not None] + [0]) + 1
        self.collectives = [boundary.get(k, []) for k in range(n_segments)]
        outputs = [o.name for o in graph.output]
        self.output_names = outputs
        # Which names each later segment, collective or the graph's outputs read.
        later_reads: list[set[str]] = [set() for _ in range(n_segments)]
        for node, s in zip(graph.node, node_stage):
            if s is None:
                continue
            for i in _reads(node):
                for k in range(s):
                    later_reads[k].add(i)
        for k, cs in enumerate(self.collectives):
            for c in cs:
                for j in range(k + 1):
                    later_reads[j].add(c.input)
        types = {v.name: v.type for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
        # External weights: the segment is handed over as bytes and ORT told where the data file
        # lies (it refuses external paths outside a model file's folder, so no copies, no links).
        self._data_folder = self.path.parent if any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer) else None
        self.sessions = []
        self.segment_inputs: list[list[str]] = []
        self.segment_outputs: list[list[str]] = []
        for k in range(n_segments):
            nodes = [n for n, s in zip(graph.node, node_stage) if s == k]
            produced = {o for n in nodes for o in n.output}
            needed = [i for n in nodes for i in _reads(n)]
            seg_inputs = list(dict.fromkeys(i for i in needed if i not in produced and i not in inits))
            seg_inits = [t for t in graph.initializer if t.name in set(needed)]
            seg_outputs = [o for o in dict.fromkeys(o for n in nodes for o in n.output)
                           if o in outputs or o in later_reads[k]]
            missing = [n for n in seg_inputs + seg_outputs if n not in types]
            if missing:
                raise MoecError(f"{self.path}: value {missing[0]!r} has no type in the graph; re-run `moec optimize`")
            g = onnx.helper.make_graph(
                nodes, f"segment{k}",
                [onnx.ValueInfoProto(name=n, type=_untyped_shape(types[n])) for n in seg_inputs],
                [onnx.ValueInfoProto(name=n, type=_untyped_shape(types[n])) for n in seg_outputs],
                initializer=seg_inits)
            seg = onnx.helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
            seg.functions.extend(model.functions)
            self.sessions.append(self._session(seg, k, intra_op_threads))
            self.segment_inputs.append(seg_inputs)
            self.segment_outputs.append(seg_outputs)

    def _session(self, seg, k: int, intra_op_threads: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        if self._data_folder is not None:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self._data_folder))
        try:
            return ort.InferenceSession(seg.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MoecError(f"ONNX Runtime cannot load segment {k} of {self.path}: {str(e).strip()}") from e

    @property
    def num_collectives(self) -> int:
        return sum(len(c) for c in self.collectives)

    def run(self, feeds: dict[str, np.ndarray], collective: Callable[[Collective, np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(feeds)
        for k, session in enumerate(self.sessions):
            outs = session.run(self.segment_outputs[k], {n: env[n] for n in self.segment_inputs[k]})
            env.update(zip(self.segment_outputs[k], outs))
            for c in self.collectives[k]:
                env[c.output] = collective(c, env[c.input])
        return {n: env[n] for n in self.output_names}


def _untyped_shape(type_proto):
    """The type with its shape dropped: segment boundaries take whatever shape arrives."""
    import onnx

    t = onnx.TypeProto()
    t.CopyFrom(type_proto)
    if t.HasField("tensor_type"):
        t.tensor_type.ClearField("shape")
    return t
