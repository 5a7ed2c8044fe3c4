"""A parallel plan as data: which graph tensor is split how, and where the collectives go.

After torch.distributed's parallel styles (a plan maps names to a style, one function applies
it), but over graph tensors: ``build_plan`` reads a fused moec graph (after the fusion phase,
before lowering) and returns a ``PartitionPlan``; ``moec.passes.partition.apply`` applies it for
one rank. The plan is the same for every rank; only the slices differ (``Mapping``).

What is split (matrix weights in x @ W orientation; a Gemm with transB=1 has them transposed):
  q/k/v projections      column-split over tp, by kv-head groups (contiguous: rank t holds kv
                         heads [t K/tp, (t+1) K/tp) and the query heads that read them)
  o projection           row-split over tp, then an all-reduce over the tp group
  dense MLP gate/up      column-split over tp; down row-split over tp, then an all-reduce (tp)
  shared expert          gate/up column-split, down row-split, over the whole world
  routed experts         [E, H, 2I] / [E, I, H]: experts over ep, each expert's I over tp; the
                         router is replicated and every rank keeps only its experts' share
  MoE block              one all-reduce over the world of shared + routed partial sums
  KV cache               kv-head axis (1) split with the k/v projections
Replicated: norms, router, embedding, and the vocab projection. The vocab projection stays whole
on every rank: a split would need an all-gather along the vocab axis every step (DistCollective
gathers along the FIRST axis, so [B, S, V/r] would need a transpose on each side), and every
rank would still need the full logits row to feed the same next token; whole, it costs V x H
per rank (Llama 4: 2.1 GB in bf16, about 2% of a Maverick rank at ep 8) and no collective.
"""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from moec.common.contract import MOEC_DOMAIN, OP_GROUPED_EXPERTS, past_key, past_value
from moec.common.errors import MoecError
from moec.passes.partition.mapping import Mapping

_LINEAR = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?P<what>self_attn\.[qkvo]_proj|feed_forward\.(?:shared_expert\.)?(?:gate|up|down)_proj)\.weight"
)
_EXPERTS = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.feed_forward\.experts\.")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Split ``axis`` of a tensor into ``mapping.parts(by)`` equal parts; rank r keeps its part.
    ``halves`` = 2: the axis is [gate | up] and each half is split alike."""

    axis: int
    by: str  # "tp" | "ep" | "world"
    halves: int = 1


@dataclasses.dataclass(frozen=True)
class AttentionSplit:
    """One attention layer's head region: from the q/k/v projection outputs to the o projection."""

    layer: int
    starts: tuple[str, ...]  # q, k, v projection output value names
    stop_node: str  # the o projection node; its input is the last value of the region
    cache_inputs: tuple[str, ...]  # past_key.i, past_value.i: kv-head axis 1


@dataclasses.dataclass(frozen=True)
class AllReduce:
    value: str  # the graph value whose sum over the group replaces it
    by: str  # "tp" | "world"
    name: str


@dataclasses.dataclass(frozen=True)
class PartitionPlan:
    mapping: Mapping
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int  # routed experts per MoE layer (0: no MoE layer)
    weights: dict[str, tuple[Shard, ...]]
    attention: tuple[AttentionSplit, ...]
    all_reduces: tuple[AllReduce, ...]
    local_experts: tuple[tuple[str, int], ...]  # (GroupedExperts node name, E) to remap over ep
    replicated: tuple[str, ...]  # weight initializers every rank holds whole

    def to_dict(self) -> dict:
        m = self.mapping
        ranks = []
        for r in range(m.world_size):
            entry = {"rank": r, "tp_rank": m.tp_rank(r), "ep_rank": m.ep_rank(r),
                     "q_heads": list(m.q_heads(r, self.num_heads)), "kv_heads": list(m.kv_heads(r, self.num_kv_heads))}
            if self.num_experts:
                entry["experts"] = list(m.experts(r, self.num_experts))
            entry["tp_group"] = list(m.tp_group(r))
            ranks.append(entry)
        return {
            "mapping": m.to_dict(),
            "ranks": ranks,
            "attention_layers": [a.layer for a in self.attention],
            "sharded": {name: [dataclasses.asdict(s) for s in shards] for name, shards in sorted(self.weights.items())},
            "all_reduces": [dataclasses.asdict(a) for a in self.all_reduces],
            "replicated": sorted(self.replicated),
            "vocab_projection": "replicated",
        }


def _linear_weight(node: ir.Node) -> tuple[ir.Value, int, int] | None:
    """(weight, output-feature axis, input-feature axis) of a MatMul/Gemm with an initializer weight."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if w is None or not w.is_initializer() or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    trans_b = node.op_type == "Gemm" and int(node.attributes.get_int("transB", 0) or 0) == 1
    if node.op_type == "Gemm" and int(node.attributes.get_int("transA", 0) or 0):
        return None
    return (w, 0, 1) if trans_b else (w, 1, 0)


def build_plan(model: ir.Model, model_config: dict, mapping: Mapping) -> PartitionPlan:
    """The plan for splitting ``model`` (a fused moec graph of ``model_config``) over ``mapping``."""
    mapping.check_divisible(model_config)
    num_layers = int(model_config["num_hidden_layers"])
    moe_layers = set(int(i) for i in model_config.get("moe_layers") or [])
    graph = model.graph
    weights: dict[str, tuple[Shard, ...]] = {}
    all_reduces: list[AllReduce] = []
    proj: dict[int, dict[str, ir.Node]] = {}
    shared_down: dict[int, ir.Node] = {}

    def shard(w: ir.Value, *shards: Shard) -> None:
        kept = tuple(s for s in shards if mapping.parts(s.by) > 1)
        if not kept:
            return
        if w.name in weights and weights[w.name] != kept:
            raise MoecError(f"partition: weight {w.name!r} is used by two projections that split it differently")
        weights[w.name] = kept

    for node in graph:
        found = _linear_weight(node)
        if found is None:
            continue
        w, out_axis, in_axis = found
        m = _LINEAR.search(w.name or "")
        if m is None:
            continue
        layer, what = int(m["layer"]), m["what"]
        proj.setdefault(layer, {})[what] = node
        row_split = what.endswith(("o_proj", "down_proj"))
        if row_split and node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            raise MoecError(f"partition: {node.op_type} node {node.name!r} ({what}) has a bias; a row-split "
                            "projection with a bias would add it once per rank")
        by = "world" if ".shared_expert." in what else "tp"
        shard(w, Shard(in_axis if row_split else out_axis, by))
        if what == "feed_forward.shared_expert.down_proj":
            shared_down[layer] = node
        elif row_split and mapping.tp > 1:
            all_reduces.append(AllReduce(node.outputs[0].name, "tp", f"allreduce_tp_layer{layer}_{what.split('.')[-1]}"))

    experts_nodes = [n for n in graph if n.domain == MOEC_DOMAIN and n.op_type == OP_GROUPED_EXPERTS]
    local_experts = []
    moe_outputs: dict[int, ir.Node] = {}
    for node in experts_nodes:
        w_gu, w_d = node.inputs[3], node.inputs[4]
        m = _EXPERTS.search(w_gu.name or "")
        if m is None:
            raise MoecError(f"partition: expert weight {w_gu.name!r} of node {node.name!r} does not name its layer "
                            "(model.layers.N.feed_forward.experts.*); partition a moec export")
        layer = int(m["layer"])
        shard(w_gu, Shard(0, "ep"), Shard(2, "tp", halves=2))
        shard(w_d, Shard(0, "ep"), Shard(1, "tp"))
        if mapping.ep > 1:
            local_experts.append((node.name, int(w_gu.shape[0])))
        moe_outputs[layer] = node

    missing = []
    for layer in range(num_layers):
        have = proj.get(layer, {})
        need = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
        if layer in moe_layers:
            need += ["feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj",
                     "feed_forward.shared_expert.down_proj"]
            if layer not in moe_outputs:
                missing.append(f"layer {layer}: no fused {OP_GROUPED_EXPERTS} node")
        else:
            need += ["feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"]
        missing += [f"layer {layer}: no {w} MatMul/Gemm" for w in need if w not in have]
    if missing:
        raise MoecError("partition: the graph is not a fused moec export it can split (" + "; ".join(missing[:4])
                        + "); partition the output of `moec export` with the MoE fusion on")

    attention = []
    for layer in range(num_layers):
        p = proj[layer]
        starts = tuple(p[f"self_attn.{x}_proj"].outputs[0].name for x in "qkv")
        attention.append(AttentionSplit(layer, starts, p["self_attn.o_proj"].name, (past_key(layer), past_value(layer))))

    for layer in sorted(moe_layers):
        if mapping.world_size == 1:
            break
        combine = _combining_add(shared_down[layer].outputs[0], moe_outputs[layer].outputs[0])
        if combine is not None:
            all_reduces.append(AllReduce(combine.outputs[0].name, "world", f"allreduce_world_layer{layer}_moe"))
        else:  # no single Add joins them: reduce each (two collectives instead of one)
            all_reduces.append(AllReduce(shared_down[layer].outputs[0].name, "world", f"allreduce_world_layer{layer}_shared"))
            all_reduces.append(AllReduce(moe_outputs[layer].outputs[0].name, "world", f"allreduce_world_layer{layer}_experts"))

    sharded = set(weights)
    replicated = tuple(sorted(v.name for v in graph.initializers.values()
                              if v.name not in sharded and v.const_value is not None and v.const_value.size > 1
                              and v.const_value.dtype.is_floating_point()))  # weights, not shape constants
    return PartitionPlan(mapping, int(model_config["num_attention_heads"]), int(model_config["num_key_value_heads"]),
                         int(model_config["head_dim"]), int(model_config.get("num_local_experts") or 0) if moe_layers else 0,
                         weights, tuple(attention), tuple(all_reduces),
                         tuple(local_experts), replicated)


def _combining_add(a: ir.Value, b: ir.Value) -> ir.Node | None:
    for use in a.uses():
        node = use.node
        if node.op_type == "Add" and {id(v) for v in node.inputs} == {id(a), id(b)}:
            return node
    return None
