"""TensorRT's ``DistCollective`` ONNX op: the one form of a collective in a moec rank graph.

The attribute set is TensorRT's operator reference ("DistCollective", TensorRT 11 docs); the
spellings are what TensorRT-RTX 1.7.1's ONNX parser accepts, found by parsing probes (kept in
tests/passes/test_partition_collectives.py):

  collective_operation  string, lower case: "all_reduce", "all_gather", "broadcast", "reduce",
                        "reduce_scatter", "all_to_all", "gather", "scatter" (the docs' upper-case
                        names, and a missing attribute, are parse errors)
  reduce_op             string, lower case: "sum", "prod", "max", "min", "avg", or "none" for the
                        non-reducing collectives
  root                  int; -1 for collectives without a root (the parser's default 0 is refused
                        by addDistCollective for all_reduce)
  nb_rank               int, ranks of the communicator (> 1 for multi-device)
  groups                ints, the ranks taking part; absent: all of them
  group_size            int, len(groups); must be 0 (absent) when groups is absent

The node has one input and one output of the same dtype, in the default ONNX domain (where the
parser looks it up; onnx itself has no schema for it, so moec types its output by hand). ONNX
Runtime has no kernel for it: runtime/parallel.py cuts a rank graph at these nodes and runs the
collective with torch.distributed.
"""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir

from moec.common import contract

OP_TYPE = contract.DIST_COLLECTIVE
DOMAIN = ""
ALL_REDUCE = "all_reduce"
SUM = "sum"
NO_ROOT = -1


def make_all_reduce(x: ir.Value, *, world_size: int, group: Sequence[int], name: str) -> ir.Node:
    """A sum all-reduce of ``x`` over ``group`` (all ranks when it is every rank); its output has
    x's dtype and shape."""
    attrs = [ir.AttrString("collective_operation", ALL_REDUCE), ir.AttrString("reduce_op", SUM),
             ir.AttrInt64("root", NO_ROOT), ir.AttrInt64("nb_rank", world_size)]
    if len(group) != world_size:
        attrs += [ir.AttrInt64s("groups", list(group)), ir.AttrInt64("group_size", len(group))]
    out = ir.Value(name=f"{name}_out", shape=x.shape, type=x.type)
    return ir.Node(DOMAIN, OP_TYPE, [x], attrs, outputs=[out], name=name)


def is_collective(node) -> bool:
    """True for a DistCollective node (onnx-ir or onnx protobuf)."""
    return node.op_type == OP_TYPE and node.domain in ("", "ai.onnx")


def describe(attrs: dict) -> tuple[str, str, tuple[int, ...] | None]:
    """(collective_operation, reduce_op, groups or None) of a node's attributes as a plain dict."""
    groups = attrs.get("groups")
    return str(attrs["collective_operation"]), str(attrs.get("reduce_op", "none")), tuple(groups) if groups else None
