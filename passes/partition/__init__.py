"""Tensor- and expert-parallel partitioning of a fused moec graph: ``Mapping`` (which rank holds
what), ``build_plan`` (which tensor is split how, where the collectives go) and
``apply_partition`` (the one pass that makes a rank's graph)."""

from moec.passes.partition.apply import apply_partition, rank_metadata
from moec.passes.partition.mapping import Mapping
from moec.passes.partition.plan import PartitionPlan, build_plan

__all__ = ["Mapping", "PartitionPlan", "apply_partition", "build_plan", "rank_metadata"]
