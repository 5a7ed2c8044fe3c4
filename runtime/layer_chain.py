"""A moec graph cut into contiguous layer ranges, and the chain that runs them in sequence.

Why: TensorRT-RTX holds ~1.75x the weights of the network it compiles (build_memory_probe.md);
building the model as several engines, each a range of layers, bounds the build's peak host memory
by one range's weights instead of the model's. Each step then runs the ranges in order.

The cut: every node gets a range, the highest among
- its layer, where the export recorded it (``pkg.torch.onnx.name_scopes``: ``...model.layers.N``),
- the layer of any weight it reads (``...layers.N...``; the embedding belongs to the first range,
  ``model.norm`` and ``lm_head`` to the last),
- the layer of any past it reads as data (``past_key.N``: a Shape of it reads no data),
- the range of every value it reads.
(the first only for a node the others anchor). A node that meets none of these (rotary tables, masks, the past length: computed from
position_ids, input_ids and the pasts' shapes) is "free": it is copied into every range that
reads it, so between two ranges only the residual stream travels. The stream entering layer l
is renamed ``hidden.{l}`` [batch, new_tokens, H] (``residual_name``); a cut that would pass more
than one value is refused, naming them. Range k's inputs are the graph inputs it reads
(input_ids for the first, the position ids, its layers' pasts, and any past whose shape a copied
node reads) plus ``hidden.{first layer}``; its outputs are its layers' presents and the stream
for the next range; the last range ends with the final norm and ``logits``.

The chain: ``run_chain`` feeds each range the values it takes from one dict of names (the step's
feeds, then what earlier ranges produced) and collects the graph's outputs. ONNX Runtime
(``OrtLayerChain``, which runs here and is tested against the single graph) and the TensorRT
engines of ``moec build --layers-per-engine`` share it; only the per-range call differs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

import numpy as np
from moec.common import contract
from moec.common.errors import MoecError
from moec.runtime.parallel.segments import _reads

_WEIGHT_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SCOPE_LAYER = re.compile(r"model\.layers\.(\d+)(?![\d])")
_PAST = re.compile(r"^past_(?:key|value)\.(\d+)$")
_FIRST = ("model.embed_tokens.",)
_LAST = ("model.norm.", "lm_head.")
HIDDEN_PREFIX = "hidden."


def residual_name(layer: int) -> str:
    """The residual stream [batch, new_tokens, H] entering ``layer`` (a range's first layer)."""
    return f"{HIDDEN_PREFIX}{layer}"


def layer_ranges(num_layers: int, layers_per_engine: int) -> list[tuple[int, int]]:
    """[first, end) of each range: ``layers_per_engine`` layers each, the last takes the rest."""
    if layers_per_engine < 1:
        raise MoecError(f"--layers-per-engine {layers_per_engine}: give at least 1 (layers per engine)")
    if layers_per_engine > num_layers:
        raise MoecError(f"--layers-per-engine {layers_per_engine} exceeds the model's {num_layers} layers: give at most "
                        f"{num_layers} (or leave it out for one engine)")
    return [(lo, min(lo + layers_per_engine, num_layers)) for lo in range(0, num_layers, layers_per_engine)]


@dataclasses.dataclass(frozen=True)
class LayerRange:
    index: int
    first: int  # first layer
    end: int  # one past the last layer
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    model: object  # onnx.ModelProto: the range's nodes, its weights (external data stays where it was)

    @property
    def layers(self) -> list[int]:
        return [self.first, self.end]


def _scope_layer(node) -> int | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            found = _SCOPE_LAYER.findall(p.value)
            return int(found[-1]) if found else None
    return None


def cut_layer_ranges(model, num_layers: int, layers_per_engine: int, where: str = "the graph") -> list[LayerRange]:
    """``model`` (a moec graph, weights inline or external) as ranges of ``layers_per_engine``
    layers; one range holding the whole graph when that is every layer."""
    import onnx

    spans = layer_ranges(num_layers, layers_per_engine)
    graph = model.graph
    graph_inputs = [i.name for i in graph.input]
    if contract.IMAGE_FEATURES in graph_inputs:
        raise MoecError(f"{where} takes image features (exported with --vision); layer-range engines are text-only: "
                        "build it without --layers-per-engine")
    last = len(spans) - 1
    seg_of = [k for k, (lo, hi) in enumerate(spans) for _ in range(lo, hi)]
    inits = {t.name: t for t in graph.initializer}

    def weight_range(name: str) -> int | None:
        m = _WEIGHT_LAYER.search(name)
        if m and int(m.group(1)) < num_layers:
            return seg_of[int(m.group(1))]
        if name.startswith(_FIRST):
            return 0
        if name.startswith(_LAST):
            return last
        return None

    stage: dict[str, int | None] = {n: None for n in graph_inputs}
    node_stage: list[int | None] = []
    for node in graph.node:
        anchors = []
        for name in _reads(node):
            if name in inits:
                anchors.append(weight_range(name))
            elif stage.get(name) is not None:
                anchors.append(stage[name])
            elif (m := _PAST.match(name)) and node.op_type != "Shape" and int(m.group(1)) < num_layers:
                anchors.append(seg_of[int(m.group(1))])
        anchored = [a for a in anchors if a is not None]
        layer = _scope_layer(node)
        if anchored and layer is not None and layer < num_layers:
            # Only a node that is not free: the export shares one copy of a mask or rotary
            # table among all layers, recorded in the first layer's scope.
            anchored.append(seg_of[layer])
        s = max(anchored) if anchored else None
        node_stage.append(s)
        for o in node.output:
            stage[o] = s

    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    outputs = [o.name for o in graph.output]
    # What every range reads from an earlier one: a value of stage j read by a node of stage k > j.
    reads_by_stage: list[set[str]] = [set() for _ in spans]
    for node, s in zip(graph.node, node_stage):
        if s is not None:
            reads_by_stage[s].update(_reads(node))
    for o in outputs:
        if stage.get(o) is None:
            raise MoecError(f"{where}: output {o!r} depends on no layer's weights; not a moec graph to cut in layer ranges")
    crossing: list[list[str]] = []  # values that cross cut k (between ranges k - 1 and k)
    for k in range(1, len(spans)):
        names = sorted({v for j in range(k, len(spans)) for v in reads_by_stage[j]
                        if stage.get(v) is not None and stage[v] < k})
        if len(names) != 1 or stage[names[0]] != k - 1:
            raise MoecError(f"{where}: the cut before layer {spans[k][0]} would pass {len(names)} values "
                            f"({', '.join(names[:4])}) from earlier ranges; moec cuts where only the residual stream "
                            "crosses: build without --layers-per-engine, or report the graph")
        crossing.append(names)
    rename = {names[0]: residual_name(spans[k + 1][0]) for k, names in enumerate(crossing)}

    types = {v.name: v.type for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    ranges = []
    for k, (lo, hi) in enumerate(spans):
        chosen = {i for i, s in enumerate(node_stage) if s == k}
        # Copy the free nodes this range reads (transitively), in graph order.
        todo = [v for i in chosen for v in _reads(graph.node[i])]
        while todo:
            v = todo.pop()
            i = producer.get(v)
            if i is not None and node_stage[i] is None and i not in chosen:
                chosen.add(i)
                todo.extend(_reads(graph.node[i]))
        nodes = [graph.node[i] for i in sorted(chosen)]
        produced = {o for n in nodes for o in n.output}
        needed = list(dict.fromkeys(v for n in nodes for v in _reads(n)))
        seg_inputs = [v for v in needed if v not in produced and v not in inits]
        later = {v for j in range(k + 1, len(spans)) for v in reads_by_stage[j]}
        seg_outputs = [o for o in dict.fromkeys(o for n in nodes for o in n.output)
                       if (o in outputs and stage.get(o) == k) or (o in later and stage.get(o) == k)]
        seg_inputs = [v for v in graph_inputs if v in seg_inputs] + [v for v in seg_inputs if v not in graph_inputs]
        g = onnx.helper.make_graph(
            [_renamed(n, rename) for n in nodes], f"layers{lo}_{hi}",
            [_value_info(rename.get(v, v), v, types, where) for v in seg_inputs],
            [_value_info(rename.get(v, v), v, types, where) for v in seg_outputs],
            initializer=[inits[v] for v in needed if v in inits])
        seg = onnx.helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
        seg.functions.extend(model.functions)
        ranges.append(LayerRange(k, lo, hi, tuple(rename.get(v, v) for v in seg_inputs),
                                 tuple(rename.get(v, v) for v in seg_outputs), seg))
    return ranges


def _renamed(node, rename: dict[str, str]):
    if not any(v in rename for v in list(node.input) + list(node.output)):
        return node
    import onnx

    n = onnx.NodeProto()
    n.CopyFrom(node)
    n.input[:] = [rename.get(v, v) for v in n.input]
    n.output[:] = [rename.get(v, v) for v in n.output]
    return n


def _value_info(name: str, source: str, types: dict, where: str):
    """A range's input or output. The residual stream gets the moec axis names (batch,
    new_tokens, H), so a TensorRT profile knows its dynamic axes."""
    import onnx

    if source not in types:
        raise MoecError(f"{where}: value {source!r} has no type in the graph; re-run `moec optimize`")
    t = onnx.TypeProto()
    t.CopyFrom(types[source])
    if name.startswith(HIDDEN_PREFIX):
        dims = t.tensor_type.shape.dim
        if len(dims) != 3 or not dims[2].HasField("dim_value"):
            raise MoecError(f"{where}: the residual stream {source!r} is not [batch, new_tokens, H] with a fixed H; "
                            "re-run `moec optimize`")
        dims[0].Clear()
        dims[0].dim_param = contract.DIM_BATCH
        dims[1].Clear()
        dims[1].dim_param = contract.DIM_NEW_TOKENS
    return onnx.ValueInfoProto(name=name, type=t)


def run_chain(ranges, feeds: dict[str, np.ndarray], run_range: Callable[[int, dict], dict],
              outputs: list[str]) -> dict[str, np.ndarray]:
    """One step over the ranges in order: range k gets {name: value} for its inputs from the feeds
    and the earlier ranges' outputs; ``run_range(k, inputs)`` returns its outputs by name."""
    env = dict(feeds)
    for k, r in enumerate(ranges):
        missing = [n for n in r.inputs if n not in env]
        if missing:
            raise MoecError(f"layer range {k} (layers {r.first}-{r.end - 1}) needs {', '.join(missing)}, which no feed "
                            "or earlier range provides: the engines are not one chain; rebuild them")
        env.update(run_range(k, {n: env[n] for n in r.inputs}))
    return {n: env[n] for n in outputs}


class OrtLayerChain:
    """A moec graph's layer ranges as ONNX Runtime sessions on the CPU, run as one chain; ``run``
    takes the single graph's feeds and returns its outputs by name."""

    def __init__(self, path: str | Path, layers_per_engine: int, num_layers: int | None = None,
                 intra_op_threads: int | None = None):
        import onnx
        from moec.common.onnx_files import load_graph_structure

        self.path = Path(path)
        model = load_graph_structure(self.path)
        if num_layers is None:
            num_layers = sum(1 for i in model.graph.input if i.name.startswith("past_key."))
        self.output_names = [o.name for o in model.graph.output]
        self.ranges = cut_layer_ranges(model, num_layers, layers_per_engine, str(self.path))
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        self.sessions = [self._session(r, external, intra_op_threads) for r in self.ranges]

    def _session(self, r: LayerRange, external: bool, intra_op_threads: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        if external:
            # As SegmentedGraph: ORT reads the graph's .data file in place.
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))
        try:
            return ort.InferenceSession(r.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MoecError(f"ONNX Runtime cannot load layer range {r.index} of {self.path}: {str(e).strip()}") from e

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def one(k: int, inputs: dict) -> dict:
            names = list(self.ranges[k].outputs)
            return dict(zip(names, self.sessions[k].run(names, inputs)))

        return run_chain(self.ranges, feeds, one, self.output_names)


class _ChainInputs:
    """What OrtBackend asks of its session (the inputs' and outputs' names, shapes and types; the
    provider), answered by the ranges' sessions: each past is an input of its own range."""

    def __init__(self, chain: OrtLayerChain):
        seen = {}
        for s in chain.sessions:
            for i in s.get_inputs():
                seen.setdefault(i.name, i)
        self._inputs = list(seen.values())
        self._outputs = [o for s in chain.sessions for o in s.get_outputs()]
        self._providers = chain.sessions[0].get_providers()

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def get_providers(self):
        return self._providers


def ort_chain_backend(path: str | Path, layers_per_engine: int, intra_op_threads: int | None = None):
    """A ``moec.runtime.backend.Backend`` that runs ``path`` as layer ranges on ONNX Runtime's CPU
    provider: the generation loop over the chain, as the TensorRT engines of a
    ``--layers-per-engine`` build run it."""
    from moec.common.sidecar import read_sidecar
    from moec.runtime.ort_backend import OrtBackend, OrtCache

    sidecar = read_sidecar(Path(path))
    chain = OrtLayerChain(path, layers_per_engine, int(sidecar["num_layers"]), intra_op_threads)

    class OrtChainBackend(OrtBackend):
        name = "ort-chain"

        def forward(self, input_ids_BS, position_ids_BS, cache: OrtCache, image_features_NH=None):
            import onnxruntime as ort

            if image_features_NH is not None:
                raise MoecError(f"{path}: layer-range chains are text-only")
            batch, new = np.shape(input_ids_BS)
            if batch != cache.batch_size or cache.past_len + new > self.max_positions:
                raise MoecError(f"batch {batch} / {cache.past_len + new} positions do not fit the cache "
                                f"({cache.batch_size} sequences, {self.max_positions} positions)")
            feeds = {contract.INPUT_IDS: np.ascontiguousarray(input_ids_BS, dtype=np.int64),
                     contract.POSITION_IDS: np.ascontiguousarray(position_ids_BS, dtype=np.int64)}
            for i in range(self.num_layers):
                feeds[contract.past_key(i)] = cache.keys[i].numpy()
                feeds[contract.past_value(i)] = cache.values[i].numpy()
            out = chain.run(feeds)
            value = ort.OrtValue.ortvalue_from_numpy
            new_cache = OrtCache([value(out[contract.present_key(i)]) for i in range(self.num_layers)],
                                 [value(out[contract.present_value(i)]) for i in range(self.num_layers)],
                                 batch, cache.past_len + new)
            return out[contract.LOGITS].astype(np.float32, copy=False), new_cache

    backend = OrtChainBackend(_ChainInputs(chain), Path(path), sidecar, graph_optimization=True)
    backend.chain = chain
    return backend
