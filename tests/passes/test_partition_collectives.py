"""What TensorRT-RTX 1.7's ONNX parser takes as a DistCollective node (the attribute set from
TensorRT's operator docs, the spellings found by these parses), and that moec's node builds."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from moec.passes.partition import collectives

trt = pytest.importorskip("tensorrt_rtx")
pytestmark = pytest.mark.trt


def _model(attrs: dict | None = None, node: onnx.NodeProto | None = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])
    node = node or helper.make_node("DistCollective", ["x"], ["y"], **(attrs or {}))
    y = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, ["b", 8])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def _parse(model: onnx.ModelProto):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString())
    return ok, " ".join(str(parser.get_error(i)) for i in range(parser.num_errors)), builder, network


AR = dict(collective_operation="all_reduce", reduce_op="sum", root=-1, nb_rank=2)


@pytest.mark.parametrize("attrs,error", [
    ({}, "Attribute not found: collective_operation"),
    ({**AR, "collective_operation": "ALL_REDUCE"}, "Unknown CollectiveOperation: ALL_REDUCE"),  # the docs' spelling
    ({**AR, "reduce_op": "SUM"}, "Invalid Node"),
    ({k: v for k, v in AR.items() if k != "root"}, "root == -1"),  # the default root 0 is for rooted ops only
    ({**AR, "group_size": 2}, "Group size must be 0 if groups is empty"),
])
def test_parser_refuses(attrs, error):
    ok, errors, _, _ = _parse(_model(attrs))
    assert not ok and error in errors


@pytest.mark.parametrize("attrs", [AR, {**AR, "groups": [0, 1], "group_size": 2},
                                   dict(collective_operation="all_gather", reduce_op="none", root=-1, nb_rank=2)])
def test_parser_takes(attrs):
    ok, errors, _, network = _parse(_model(attrs))
    assert ok, errors
    assert network.get_layer(0).type == trt.LayerType.DIST_COLLECTIVE


@pytest.mark.parametrize("world,group", [(2, (0, 1)), (4, (2, 3))])
def test_moec_all_reduce_builds_an_sm89_engine(world, group):
    x = ir.Value(name="x", shape=ir.Shape(["b", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    node = collectives.make_all_reduce(x, world_size=world, group=group, name="ar")
    proto = ir.serde.serialize_node(node)
    ok, errors, builder, network = _parse(_model(node=proto))
    assert ok, errors
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(trt.ComputeCapability.SM89, 0)
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 8), (2, 8), (4, 8))
    cfg.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, cfg) is not None
