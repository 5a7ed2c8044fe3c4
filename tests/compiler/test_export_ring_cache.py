"""The export's ring caches (issue 14): the sidecar's kv_cache, and no tensor of a chunked layer
whose size follows the past length (only the NoPE layer's cache, mask and scores do)."""

from __future__ import annotations

import json

import onnx
import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler.export import ExportConfig


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _layer_of(node) -> int | None:
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    for part in scopes.split("'"):
        if part.startswith("inner.model.layers."):
            return int(part.split(".")[3])
    return None


def test_sidecar_records_each_layers_cache(demo_onnx):
    meta = json.loads(contract.sidecar_path(demo_onnx).read_text())
    assert meta["kv_cache"] == [{"layer": i, "kind": "chunked", "slots": 8} for i in range(3)] + [
        {"layer": 3, "kind": "full", "slots": meta["max_positions"]}]


def test_chunked_layers_hold_nothing_that_grows_with_the_past(demo_onnx):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(demo_onnx)))
    shapes = {v.name: _dims(v) for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    grows = lambda name: any("past_len" in str(d) for d in shapes.get(name, []))
    by_layer: dict[int, list[str]] = {}
    for node in model.graph.node:
        layer = _layer_of(node)
        if layer is not None:
            by_layer.setdefault(layer, []).extend(o for o in node.output if o in shapes)
    assert sorted(by_layer) == [0, 1, 2, 3]
    # Shape inference reached the layers (a check that sees no shapes proves nothing).
    assert all(len(names) > 20 for names in by_layer.values())
    assert not [n for layer in (0, 1, 2) for n in by_layer[layer] if grows(n)]
    assert [n for n in by_layer[3] if grows(n)], "the NoPE layer's keys and scores follow the past"
    softmax_keys = sorted(str(shapes[n.input[0]][3]) for n in model.graph.node if n.op_type == "Softmax")
    assert softmax_keys == ["new_tokens + 8"] * 3 + ["past_len + new_tokens"]


def test_chunked_cache_choice_is_checked():
    with pytest.raises(MoecError, match="unknown chunked_cache 'sliding'; choose one of ring, full"):
        ExportConfig(chunked_cache="sliding")
