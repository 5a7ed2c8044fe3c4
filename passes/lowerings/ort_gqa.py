"""fuse_ort_gqa: ONNX Attention over moec's KV cache -> com.microsoft.GroupQueryAttention (ONNX Runtime only).

After fuse_attention (and fuse_rotary, fuse_qk_norm) a layer's attention reads::

    q_BNSD = Transpose(q_BSND)                                   RoPE, QK norm, temperature tuning before it
    k_BKTD = Concat(past_key.i, Transpose(k_BSKD), axis=2)       (same for v with past_value.i)
    y_BSND = Transpose(Attention(q_BNSD, k_BKTD, v_BKTD, mask, scale=s))
    present_key.i = Gather(k_BKTD, ring_index, axis=2)           a chunked layer's ring [B, K, R, D]
                  = k_BKTD                                       a full cache [B, K, P + S, D]

and becomes::

    y_BSH, present_key.i, present_value.i = GroupQueryAttention(
        q_BSH, k_BSH, v_BSH, past_key.i, past_value.i, seqlens_k_B, total_len,
        num_heads=N, kv_num_heads=K, scale=s, do_rotary=0, local_window_size=-1)

where q/k/v_BSH are the [B, S, heads*D] tensors the heads were split from where the graph has them
(else a Reshape), and y_BSH replaces the Reshape that flattens the heads for o_proj (each node costs
ONNX Runtime a dispatch: 16 fewer Reshapes per step at h512), with ``seqlens_k_B`` = the last new position of each row (P + S - 1) and ``total_len`` = P + S, both
computed once from position_ids (int32, as the op wants). GroupQueryAttention (ContribOperators.md)
masks causally by itself: key slot j holds position j and query i sits at seqlens_k + 1 - S + i.
Its past and present are BNSH like moec's cache. Given a past [B, K, R, D] with R >= P + S its
present is [B, K, R, D] again, and when the caller binds the same buffer as past and present it
writes the S new keys at slots P .. P + S - 1 in place (runtime/ort_backend.py does for the layers
this pass lists); otherwise it copies the past. A full cache (past [B, K, P, D]) grows to P + S.

When that is the model's own attention, and when it is not (refused, with the reason):
- The mask is dropped, so the layer must attend causally over every position it can hold: a
  chunked layer only when its chunk covers max_positions (GroupQueryAttention's local_window_size
  is a sliding window, not Llama 4's aligned chunks), a ring only when it never wraps (R >=
  max_positions: slot p holds position p). Which layers are chunked comes from the export's
  sidecar (``GqaLayout.from_sidecar``); without one every layer is refused.
- fp32 only: an fp16/bf16 export's Attention carries softmax_precision=FLOAT (the model's fp32
  softmax), which GroupQueryAttention cannot say.
- RoPE and the QK norm stay before it (do_rotary=0): Llama 4 normalizes q and k after RoPE, while
  the op would rotate its inputs after they arrive. NoPE layers' temperature tuning scales q
  before the Transpose, so it reaches the op's query as is.
- Batch > 1 with S > 1 after a past is what the op cannot run ("batch_size must be 1 when
  sequence_length > 1 and past context is given"); runtime/ort_backend.py refuses that step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from moec.common import contract
from moec.passes import ops
from moec.passes.fusions._graph import (FusionLog, Refuse, attr, consumers, insert_and_replace, name_new_nodes,
                                        producer_is, remove_dead)

NAME = "fuse_ort_gqa"
ORT_DOMAIN = "com.microsoft"
CHUNKED_ATTENTION = "chunked_attention"  # a layer_types entry of the model config (models/config.py)
_BSND_TO_BNSD = [0, 2, 1, 3]


@dataclasses.dataclass(frozen=True)
class GqaLayout:
    """What the graph does not say about its attention: the export's positions and which layers
    attend in chunks."""

    max_positions: int
    attention_chunk: int | None
    chunked_layers: frozenset[int]

    @classmethod
    def from_sidecar(cls, sidecar: dict | None) -> "GqaLayout | None":
        if not sidecar or "max_positions" not in sidecar:
            return None
        mc = sidecar.get("model_config") or {}
        types = mc.get("layer_types") or []
        return cls(int(sidecar["max_positions"]), mc.get("attention_chunk_size"),
                   frozenset(i for i, t in enumerate(types) if t == CHUNKED_ATTENTION))


def _ints(value: ir.Value | None) -> list[int] | None:
    t = None if value is None else ir.convenience.get_const_tensor(value)
    return None if t is None else [int(v) for v in t.numpy().ravel()]


def _layer_of(past: ir.Value, graph: ir.Graph, kind: str) -> int:
    """The layer whose past_key.<i> / past_value.<i> graph input ``past`` is."""
    name = contract.past_key if kind == "key" else contract.past_value
    if past in graph.inputs:
        for i in range(len(graph.inputs)):
            if past.name == name(i):
                return i
    raise Refuse(f"the {kind}s are not a graph input {name(0)[:-1]}<layer> concatenated with the new ones")


def _new_from_transpose(value: ir.Value, what: str) -> ir.Value:
    """The [B, S, heads, D] tensor ``value`` is the BNSD transpose of (one consumer, static heads/D)."""
    t = producer_is(value, "Transpose")
    if t is None or list(attr(t, "perm", [])) != _BSND_TO_BNSD:
        raise Refuse(f"the new {what} are not a [B, S, heads, D] -> [B, heads, S, D] Transpose")
    x = t.inputs[0]
    if x.shape is None or x.shape.rank() != 4 or not all(isinstance(d, int) for d in x.shape[2:]):
        raise Refuse(f"the new {what} {x.name!r} are not [B, S, heads, D] with static heads and D")
    if len(consumers(value)) != 1 or value.is_graph_output():
        raise Refuse(f"the transposed {what} {value.name!r} have other consumers")
    return x


def _match(attn: ir.Node, graph: ir.Graph, layout: GqaLayout | None) -> dict:
    if layout is None:
        raise Refuse("no moec sidecar: which layers attend in chunks, and the export's max_positions, are unknown")
    if len(attn.inputs) != 4 or any(v is None for v in attn.inputs) or len([o for o in attn.outputs if o.uses() or o.is_graph_output()]) != 1:
        raise Refuse("not an Attention(q, k, v, mask) with one output (its own past/present inputs are not moec's)")
    q_BNSD, k_BKTD, v_BKTD, mask = attn.inputs
    if q_BNSD.dtype != ir.DataType.FLOAT or attr(attn, "softmax_precision") is not None:
        raise Refuse(f"q is {q_BNSD.dtype}: fp32 only (an fp16/bf16 export's softmax runs in fp32 "
                     "(softmax_precision), which GroupQueryAttention cannot say)")
    for name in ("is_causal", "softcap", "qk_matmul_output_mode", "q_num_heads", "kv_num_heads"):
        if attr(attn, name, 0) not in (0, 0.0):
            raise Refuse(f"Attention sets {name}, which this rewrite does not carry over")
    if attr(attn, "scale") is None:
        raise Refuse("Attention has no explicit scale")
    q_BSND = _new_from_transpose(q_BNSD, "queries")
    N, D = q_BSND.shape[2], q_BSND.shape[3]
    layers, cache = set(), {}
    for kind, kv in (("key", k_BKTD), ("value", v_BKTD)):
        cat = producer_is(kv, "Concat")
        if cat is None or len(cat.inputs) != 2 or attr(cat, "axis") not in (2, -2):
            raise Refuse(f"the {kind}s are not Concat(past_{kind}.<layer>, new, axis=2)")
        layers.add(_layer_of(cat.inputs[0], graph, kind))
        new = _new_from_transpose(cat.inputs[1], f"{kind}s")
        users = [u for u in consumers(kv) if u is not attn]
        if kv.is_graph_output() and not users:
            present, gather = kv, None  # a full cache: the Concat is the present
        elif len(users) == 1 and users[0].op_type == "Gather" and users[0].domain in ("", "ai.onnx") \
                and users[0].inputs[0] is kv and attr(users[0], "axis", 0) in (2, -2) and users[0].outputs[0].is_graph_output():
            present, gather = users[0].outputs[0], users[0]  # a ring: the slots it keeps
        else:
            raise Refuse(f"the {kind}s {kv.name!r} are neither the present (a full cache) nor gathered into it (a ring)")
        cache[kind] = dict(past=cat.inputs[0], new=new, concat=cat, gather=gather, present=present)
    if len(layers) != 1:
        raise Refuse(f"keys and values come from different layers' caches {sorted(layers)}")
    layer = layers.pop()
    kk, vv = cache["key"]["new"], cache["value"]["new"]
    K = kk.shape[2]
    if list(vv.shape[2:]) != [K, D] or kk.shape[3] != D or N % K:
        raise Refuse(f"heads {N}, kv heads {K}/{vv.shape[2]}, head dims {D}/{kk.shape[3]}/{vv.shape[3]}: "
                     "N a multiple of K, one D")
    if cache["key"]["present"].name != contract.present_key(layer) or cache["value"]["present"].name != contract.present_value(layer):
        raise Refuse(f"layer {layer}'s presents are not the graph outputs {contract.present_key(layer)}/{contract.present_value(layer)}")
    ring = cache["key"]["gather"] is not None
    if ring != (cache["value"]["gather"] is not None):
        raise Refuse(f"layer {layer}'s keys and values have different cache kinds")
    if layer in layout.chunked_layers and (layout.attention_chunk is None or layout.attention_chunk < layout.max_positions):
        raise Refuse(f"layer {layer} attends in chunks of {layout.attention_chunk} < max_positions {layout.max_positions}: "
                     "GroupQueryAttention masks causally (its local_window_size is a sliding window, not Llama 4's chunks)")
    slots = cache["key"]["past"].shape[2] if cache["key"]["past"].shape is not None else None
    if ring and (not isinstance(slots, int) or slots < layout.max_positions):
        raise Refuse(f"layer {layer}'s ring of {slots} slots wraps before max_positions {layout.max_positions}: "
                     "GroupQueryAttention writes position p at slot p")
    if mask.shape is None or mask.shape.rank() != 4:
        raise Refuse("the mask is not a known 4D tensor")
    users = consumers(attn.outputs[0])
    if len(users) != 1 or users[0].op_type != "Transpose" or list(attr(users[0], "perm", [])) != _BSND_TO_BNSD \
            or attn.outputs[0].is_graph_output():
        raise Refuse("the attention output is not transposed back to [B, S, N, D] alone")
    out = users[0].outputs[0]
    # Usually the next node flattens the heads again ([B, S, N*D], for o_proj): then the op's own
    # [B, S, N*D] output replaces that Reshape's, and neither Reshape runs (each node costs ORT a dispatch).
    flat = consumers(out)
    if len(flat) == 1 and flat[0].op_type == "Reshape" and not out.is_graph_output() and _is_bsh_of(flat[0].outputs[0], out):
        out, flattened = flat[0].outputs[0], True
    else:
        flattened = False
    return dict(attn=attn, layer=layer, ring=ring, q=q_BSND, k=kk, v=vv, N=N, K=K, D=D,
                scale=float(attr(attn, "scale")), out=out, flattened=flattened, cache=cache)


def _is_bsh_of(x_BSH: ir.Value, x_BSND: ir.Value) -> bool:
    """``x_BSH`` is [B, S, heads*D] over the same B and S as ``x_BSND`` [B, S, heads, D] (known shapes)."""
    a, b = x_BSH.shape, x_BSND.shape
    if a is None or b is None or a.rank() != 3 or b.rank() != 4 or not all(isinstance(d, int) for d in b[2:]):
        return False
    same_bs = all(isinstance(x, ir.SymbolicDim) and isinstance(y, ir.SymbolicDim) and x.value is not None and x.value == y.value
                  or isinstance(x, int) and x == y for x, y in zip(a[:2], b[:2]))
    return same_bs and a[2] == b[2] * b[3]


def _as_bsh(op, x_BSND: ir.Value) -> ir.Value:
    """[B, S, heads, D] as [B, S, heads*D]: the tensor it was reshaped from where there is one, else a Reshape."""
    src = producer_is(x_BSND, "Reshape")
    if src is not None and _is_bsh_of(src.inputs[0], x_BSND):
        return src.inputs[0]
    return op.Reshape(x_BSND, op.Constant(value_ints=[0, 0, x_BSND.shape[2] * x_BSND.shape[3]]))


def _seqlens(graph: ir.Graph) -> tuple[ir.Value, ir.Value, list[ir.Node]]:
    """(seqlens_k int32 [B] = P + S - 1, total_sequence_length int32 scalar = P + S) from position_ids
    (rows run P .. P + S - 1: the generation contract)."""
    pos = next((v for v in graph.inputs if v.name == contract.POSITION_IDS), None)
    if pos is None:
        raise Refuse(f"the graph has no {contract.POSITION_IDS} input")
    op = ops.OpBuilder()
    last_B = op.ReduceMax(pos, op.Constant(value_ints=[1]), keepdims=0)
    seqlens = op.Cast(last_B, to=ir.DataType.INT32)
    total = op.Cast(op.Add(op.ReduceMax(pos, keepdims=0), op.Constant(value=ir.tensor(np.array(1, np.int64)))),
                    to=ir.DataType.INT32)
    seqlens.dtype = total.dtype = ir.DataType.INT32
    name_new_nodes(op.nodes, "ort_gqa/seqlens")
    return seqlens, total, op.nodes


def _rewrite(graph: ir.Graph, m: dict, seqlens: ir.Value, total: ir.Value) -> None:
    op = ops.OpBuilder()
    N, K, D, c = m["N"], m["K"], m["D"], m["cache"]
    q, k, v = _as_bsh(op, m["q"]), _as_bsh(op, m["k"]), _as_bsh(op, m["v"])
    y_BSH, present_k, present_v = op.GroupQueryAttention(
        q, k, v, c["key"]["past"], c["value"]["past"], seqlens, total, num_heads=N, kv_num_heads=K, scale=m["scale"],
        do_rotary=0, local_window_size=-1, _domain=ORT_DOMAIN, _outputs=3)
    y = y_BSH if m["flattened"] else op.Reshape(y_BSH, op.Constant(value_ints=[0, 0, N, D]))
    for v_ in (y_BSH, present_k, present_v, y):
        v_.dtype = ir.DataType.FLOAT
    name_new_nodes(op.nodes, f"ort_gqa_{m['layer']}")
    insert_and_replace(graph, m["attn"], op.nodes, [m["out"], c["key"]["present"], c["value"]["present"]],
                       [y, present_k, present_v])


def fuse_ort_gqa(model: ir.Model, layout: GqaLayout | None, log: FusionLog | None = None) -> list[int]:
    """Rewrite every layer's attention it can; returns the layers rewritten (in order). Refusals go to ``log``."""
    graph = model.graph
    matches = []
    for attn in [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        try:
            matches.append(_match(attn, graph, layout))
        except Refuse as e:
            if log is not None:
                log.refuse(NAME, attn, str(e))
    if not matches:
        return []
    try:
        seqlens, total, nodes = _seqlens(graph)
    except Refuse as e:
        if log is not None:
            log.refuse(NAME, matches[0]["attn"], str(e))
        return []
    graph.insert_before(next(iter(graph)), nodes)
    for m in matches:
        _rewrite(graph, m, seqlens, total)
    model.opset_imports.setdefault(ORT_DOMAIN, 1)
    remove_dead(model)
    return sorted(m["layer"] for m in matches)
