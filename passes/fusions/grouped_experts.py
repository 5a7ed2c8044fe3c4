"""fuse_grouped_experts: the expert computation -> one moec.GroupedExperts node per MoE layer.

It starts from what ``fuse_moe_gating`` leaves: ``dense_TE = ScatterElements(zeros, ids, scores)``
next to a moec.MoEGating node, and follows the dense score matrix's consumers. Two forms:

(a) dense over experts (moec's export, transformers' Llama4TextExperts; Mixtral-style as a variant)
    score on input:  h = Reshape(Mul(Tile(x_TH, [E, 1]), Reshape(Transpose(dense_TE), [-1, 1])), [E, T, H])
                     out = ReduceSum(Reshape(SwiGLU_E(h)), axis 0)
    score on output: out = ReduceSum(Mul(SwiGLU_E(Expand(Unsqueeze(x_TH, 0))), Unsqueeze(Transpose(dense_TE), -1)), axis 0)
    with SwiGLU_E(h) = MatMul(Mul(SiLU(g), u), w_down_EIH), g, u = Split(MatMul(h, w_gate_up_EHI2), 2, axis -1),
    SiLU(g) = Mul(g, Sigmoid(g)).
(b) per expert (an unrolled expert loop): s_e = Slice(dense_TE, e, e+1, axis 1) for each e, and
    y_e = MLP_e(Mul(x_TH, s_e)) (score on input) or Mul(MLP_e(x_TH), s_e) (score on output), where
    MLP_e is a SwiGLU of three MatMul/Gemm with constant weights; the y_e are summed by a chain of
    Adds onto a base (the shared expert's output).
Check (refusal reasons): constant weights of matching shapes, every column of the score matrix
used exactly once (b), no intermediate with a consumer outside the pattern, SwiGLU only.
Rewrite: out = GroupedExperts(x_TH, ids, scores, w_gate_up_EHI2, w_down_EIH) (b: Add(base, out)),
with stacked [E, H, 2I] / [E, I, H] weights (b: built lazily when the model is saved).
The shared expert is not touched: it stays a plain MLP.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.common.contract import MOEC_DOMAIN, OP_MOE_GATING
from moec.passes import ops
from moec.passes.fusions._graph import (
    FusionLog, Refuse, attr, check_private, const_array, consumers, insert_and_replace, is_initializer,
    name_new_nodes, producer_is, rank, remove_dead, walk_back,
)

NAME = "fuse_grouped_experts"
_SHAPE_OPS = ("Reshape",)
_BROADCAST_OPS = ("Tile", "Expand", "Unsqueeze")


def _gated_dense(gating: ir.Node) -> tuple[ir.Value, ir.Node, list[ir.Node]]:
    """The ScatterElements that rebuilds the dense [T, E] score matrix from a gating node."""
    ids, scores = gating.outputs
    for scatter in consumers(ids):
        if scatter.op_type == "ScatterElements" and scatter.inputs[1] is ids:
            upd, extra = walk_back(scatter.inputs[2], ("Cast",))
            if upd is scores:
                return scatter.outputs[0], scatter, extra
    raise Refuse("no dense score matrix is built from this gating node")


def _other(node: ir.Node, value: ir.Value) -> ir.Value:
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a


def _swiglu_halves(act: ir.Value) -> tuple[ir.Value, ir.Value, list[ir.Node]]:
    """act = Mul(SiLU(g), u), SiLU written Mul(g, Sigmoid(g)), operands in either order;
    returns (g, u, the three nodes). Both expert forms (stacked and unrolled) start here."""
    mul = producer_is(act, "Mul")
    if mul is None:
        raise Refuse(f"{act.name!r} is not Mul(SiLU(gate), up)")
    for silu_v, up in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        silu = producer_is(silu_v, "Mul")
        if silu is None:
            continue
        for g, sig_v in ((silu.inputs[0], silu.inputs[1]), (silu.inputs[1], silu.inputs[0])):
            sig = producer_is(sig_v, "Sigmoid")
            if sig is not None and sig.inputs[0] is g:
                return g, up, [mul, silu, sig]
    raise Refuse(f"{act.name!r} is not Mul(SiLU(gate), up)")


def _split_swiglu(act: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """act = Mul(SiLU(g), u) with g, u the halves of one tensor; returns (gate_up, nodes)."""
    g, up, nodes = _swiglu_halves(act)
    split = producer_is(g, "Split")
    if split is None or producer_is(up, "Split") is not split:
        raise Refuse("gate and up are not the two halves of one Split")
    if list(split.outputs) != [g, up]:
        raise Refuse("the Split's first half is not the gate (gate first, then up)")
    if attr(split, "axis", 0) not in (-1, rank(split.inputs[0]) - 1 if rank(split.inputs[0]) else -1):
        raise Refuse("the gate/up Split is not on the last axis")
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = const_array(split.inputs[1])
        if sizes is None or len(set(sizes.tolist())) != 1:
            raise Refuse("the gate/up Split is not into equal halves")
    return split.inputs[0], [*nodes, split]


def _weight_3d(value: ir.Value, what: str) -> ir.Value:
    if not is_initializer(value) or rank(value) != 3:
        raise Refuse(f"{what} {value.name!r} is not a constant rank-3 initializer")
    return value


def _match_dense(dense: ir.Value) -> dict:
    users = consumers(dense)
    if len(users) != 1 or users[0].op_type != "Transpose" or list(attr(users[0], "perm", [])) != [1, 0]:
        raise Refuse("the dense score matrix does not feed one Transpose(perm=[1, 0])")
    transpose = users[0]
    nodes = [transpose]
    nxt = consumers(transpose.outputs[0])
    if len(nxt) != 1 or nxt[0].op_type not in ("Reshape", "Unsqueeze"):
        raise Refuse("the transposed scores do not feed one Reshape/Unsqueeze")
    score_on_input = int(nxt[0].op_type == "Reshape")
    nodes.append(nxt[0])
    s_col = nxt[0].outputs[0]
    users = consumers(s_col)
    if len(users) != 1 or users[0].op_type != "Mul":
        raise Refuse("the per-expert scores do not feed one Mul")
    smul = users[0]
    nodes.append(smul)
    if score_on_input:
        if const_array(nxt[0].inputs[1]) is not None and list(const_array(nxt[0].inputs[1]).reshape(-1)) != [-1, 1]:
            raise Refuse("the transposed scores are not reshaped to [E*T, 1]")
        x_rep, bcast = walk_back(_other(smul, s_col), _BROADCAST_OPS)
        nodes += bcast
        h, reshapes = smul.outputs[0], []
        while len(consumers(h)) == 1 and consumers(h)[0].op_type == "Reshape":
            reshapes.append(consumers(h)[0])
            h = reshapes[-1].outputs[0]
        nodes += reshapes
        users = consumers(h)
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[0] is not h:
            raise Refuse("the scaled hidden state does not feed one MatMul")
        gu_mm = users[0]
        # Forward to the down projection: the MatMul within a few nodes whose weight is rank 3.
        frontier, down = [gu_mm.outputs[0]], None
        for _ in range(5):
            frontier = [o for v in frontier for n in consumers(v) for o in n.outputs]
            down = next((o.producer() for o in frontier if o.producer().op_type == "MatMul"
                         and rank(o.producer().inputs[1]) == 3), None)
            if down is not None:
                break
        if down is None:
            raise Refuse("no down-projection MatMul follows the gate/up MatMul")
        y = down.outputs[0]
        # Reshapes, and the up-cast torch puts before an fp16/bf16 sum.
        while len(consumers(y)) == 1 and consumers(y)[0].op_type in ("Reshape", "Cast"):
            nodes.append(consumers(y)[0])
            y = consumers(y)[0].outputs[0]
        users = consumers(y)
        reduce = users[0] if len(users) == 1 and users[0].op_type == "ReduceSum" else None
        x_TH = x_rep
    else:
        y, reshapes = walk_back(_other(smul, s_col), _SHAPE_OPS)
        nodes += reshapes
        down = producer_is(y, "MatMul")
        if down is None:
            raise Refuse("the output-scaled value is not an expert MatMul")
        y_scaled = smul.outputs[0]
        if len(consumers(y_scaled)) == 1 and consumers(y_scaled)[0].op_type == "Cast":
            nodes.append(consumers(y_scaled)[0])  # the up-cast before an fp16/bf16 sum
            y_scaled = consumers(y_scaled)[0].outputs[0]
        users = consumers(y_scaled)
        reduce = users[0] if len(users) == 1 and users[0].op_type == "ReduceSum" else None
        x_TH = None
    if reduce is None:
        raise Refuse("the expert outputs are not summed by one ReduceSum")
    axes = const_array(reduce.inputs[1]) if len(reduce.inputs) > 1 else None
    if axes is None or list(axes.reshape(-1)) != [0] or attr(reduce, "keepdims", 1) != 0:
        raise Refuse("the ReduceSum does not sum over the expert axis 0")
    nodes.append(reduce)
    out = reduce.outputs[0]
    users = consumers(out)
    if len(users) == 1 and users[0].op_type == "Cast" and not out.is_graph_output():
        nodes.append(users[0])  # back down from the fp32 sum
        out = users[0].outputs[0]
    w_down = _weight_3d(down.inputs[1], "down-projection weight")
    gate_up, sw_nodes = _split_swiglu(down.inputs[0])
    gu_mm = producer_is(gate_up, "MatMul")
    if gu_mm is None:
        raise Refuse("gate/up do not come from a MatMul")
    w_gate_up = _weight_3d(gu_mm.inputs[1], "gate/up weight")
    nodes += [down, gu_mm, *sw_nodes]
    if x_TH is None:
        x_TH, bcast = walk_back(gu_mm.inputs[0], _BROADCAST_OPS)
        nodes += bcast
    if rank(x_TH) not in (None, 2):
        raise Refuse(f"the hidden state {x_TH.name!r} reaching the experts is not [T, H]")
    E, H, I2 = w_gate_up.shape
    if I2 % 2 or tuple(w_down.shape) != (E, I2 // 2, H):
        raise Refuse(f"expert weights {tuple(w_gate_up.shape)} / {tuple(w_down.shape)} are not [E,H,2I] / [E,I,H]")
    return dict(x=x_TH, w_gate_up=w_gate_up, w_down=w_down, score_on_input=score_on_input,
                nodes=nodes, out=out, before=reduce, base=None)


def _linear(value: ir.Value) -> tuple[ir.Value, ir.Value, bool, ir.Node]:
    """value = x @ W (MatMul) or Gemm(x, W, transB); returns (x, W, transposed, node)."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        raise Refuse(f"{value.name!r} is not a MatMul/Gemm")
    if node.op_type == "MatMul" and is_initializer(node.inputs[1]) and rank(node.inputs[1]) == 2:
        return node.inputs[0], node.inputs[1], False, node
    if (node.op_type == "Gemm" and is_initializer(node.inputs[1]) and (len(node.inputs) < 3 or node.inputs[2] is None)
            and attr(node, "transA", 0) == 0 and attr(node, "alpha", 1.0) == 1.0):
        return node.inputs[0], node.inputs[1], bool(attr(node, "transB", 0)), node
    raise Refuse(f"{value.name!r} is not a bias-free MatMul/Gemm with a constant weight")


def _expert_mlp(y: ir.Value) -> dict:
    x_in, w_d, t_d, down = _linear(y)
    g, up_v, (mul, silu, sig) = _swiglu_halves(x_in)
    xg, w_g, t_g, gate = _linear(g)
    xu, w_u, t_u, up = _linear(up_v)
    if xg is not xu:
        raise Refuse("gate and up projections read different inputs")
    return dict(x=xg, w=((w_g, t_g), (w_u, t_u), (w_d, t_d)), nodes=[down, mul, silu, sig, gate, up])


def _column(node: ir.Node, dense: ir.Value) -> tuple[int, ir.Value, list[ir.Node]]:
    if node.op_type == "Slice":
        starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
        axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.array([0])
        steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.array([1])
        if starts is None or ends is None or axes is None or steps is None:
            raise Refuse("a Slice of the score matrix has non-constant bounds")
        if list(axes.reshape(-1)) not in ([1], [-1]) or list(steps.reshape(-1)) != [1] or int(ends.flat[0]) != int(starts.flat[0]) + 1:
            raise Refuse("a Slice of the score matrix is not one expert column")
        return int(starts.flat[0]), node.outputs[0], [node]
    if node.op_type == "Gather" and attr(node, "axis", 0) in (1, -1):
        idx = const_array(node.inputs[1])
        unsq = consumers(node.outputs[0])
        if idx is None or idx.size != 1 or len(unsq) != 1 or unsq[0].op_type != "Unsqueeze":
            raise Refuse("a Gather of the score matrix is not one expert column")
        return int(idx.flat[0]), unsq[0].outputs[0], [node, unsq[0]]
    raise Refuse(f"the score matrix feeds {node.op_type} {node.name!r}, not a per-expert column")


def _match_unrolled(dense: ir.Value, num_experts: int) -> dict:
    cols: dict[int, tuple[ir.Value, list[ir.Node]]] = {}
    for node in consumers(dense):
        e, s, extra = _column(node, dense)
        if e in cols:
            raise Refuse(f"expert column {e} of the score matrix is read twice")
        cols[e] = (s, extra)
    if sorted(cols) != list(range(num_experts)):
        raise Refuse(f"the score matrix's columns used are {sorted(cols)}, expected all of 0..{num_experts - 1}")
    nodes, experts, x, soi_seen = [], [], None, set()
    adds: dict[ir.Node, ir.Value] = {}
    for e in range(num_experts):
        s, extra = cols[e]
        nodes += extra
        users = consumers(s)
        if len(users) != 1 or users[0].op_type != "Mul":
            raise Refuse(f"expert {e}'s score column does not feed one Mul")
        smul = users[0]
        other = _other(smul, s)
        mlp_users = consumers(smul.outputs[0])
        if len(mlp_users) == 1 and mlp_users[0].op_type == "Add":  # score on the output
            mlp = _expert_mlp(other)
            soi, y_e, x_e = 0, smul.outputs[0], mlp["x"]
        else:
            soi, x_e = 1, other
            lins = consumers(smul.outputs[0])
            downs = {n for lin in lins for n in _downstream_linear(lin)}
            if len(downs) != 1:
                raise Refuse(f"expert {e}'s scaled input does not reach one down projection")
            y_e = next(iter(downs)).outputs[0]
            mlp = _expert_mlp(y_e)
            if mlp["x"] is not smul.outputs[0]:
                raise Refuse(f"expert {e}'s MLP does not read its scaled input")
        soi_seen.add(soi)
        if x is None:
            x = x_e
        elif x_e is not x:
            raise Refuse(f"expert {e} reads a different hidden state than expert 0")
        users = consumers(y_e)
        if len(users) != 1 or users[0].op_type != "Add":
            raise Refuse(f"expert {e}'s output is not added into the layer output")
        adds[users[0]] = y_e
        nodes += [smul, *mlp["nodes"]]
        experts.append(mlp["w"])
    if len(soi_seen) != 1:
        raise Refuse("experts mix score-on-input and score-on-output")
    # The Adds must form one chain: base + y_a + y_b + ...
    ends = [a for a in adds if not any(u in adds for u in consumers(a.outputs[0]))]
    if len(ends) != 1:
        raise Refuse("the expert outputs are not summed by one chain of Adds")
    chain, base, node = [], None, ends[0]
    while node is not None:
        chain.append(node)
        prev = _other(node, adds[node])
        p = prev.producer()
        if p in adds:
            node = p
        else:
            base, node = prev, None
    if len(chain) != num_experts:
        raise Refuse("the expert outputs are not summed by one chain of Adds")
    nodes += chain
    return dict(x=x, experts=experts, score_on_input=soi_seen.pop(), nodes=nodes, out=ends[0].outputs[0],
                before=ends[0], base=base)


def _downstream_linear(lin: ir.Node) -> list[ir.Node]:
    """The down projection reached from a gate/up projection (through SiLU and the gating Mul)."""
    found, frontier = [], [lin]
    for _ in range(4):
        frontier = [u for n in frontier for o in n.outputs for u in consumers(o)]
        found += [n for n in frontier if n.op_type in ("MatMul", "Gemm") and is_initializer(n.inputs[1])]
        frontier = [n for n in frontier if n.op_type in ("Mul", "Sigmoid")]
    return found


def _stacked(experts: list, dtype: ir.DataType) -> tuple[ir.TensorProtocol, ir.TensorProtocol]:
    """[E, H, 2I] and [E, I, H] stacks of per-expert weights, computed when the model is written so
    the originals are read once and no second copy lives in memory before that."""
    def as_hi(w: ir.Value, transposed: bool) -> np.ndarray:
        a = w.const_value.numpy()
        return a.T if transposed else a

    (wg0, tg0), _, (wd0, td0) = experts[0]
    h, i = as_hi(wg0, tg0).shape
    E = len(experts)

    def gate_up():
        return ir.tensor(np.stack([np.concatenate([as_hi(*g), as_hi(*u)], axis=1) for g, u, _ in experts]))

    def down():
        return ir.tensor(np.stack([as_hi(*d) for _, _, d in experts]))

    return (ir.LazyTensor(gate_up, dtype=dtype, shape=ir.Shape([E, h, 2 * i])),
            ir.LazyTensor(down, dtype=dtype, shape=ir.Shape([E, i, h])))


def _check_unrolled_shapes(experts: list) -> None:
    shapes = set()
    for (wg, tg), (wu, tu), (wd, td) in experts:
        g = tuple(wg.shape)[::-1] if tg else tuple(wg.shape)
        u = tuple(wu.shape)[::-1] if tu else tuple(wu.shape)
        d = tuple(wd.shape)[::-1] if td else tuple(wd.shape)
        if g != u or d != g[::-1]:
            raise Refuse(f"expert weights gate {g}, up {u}, down {d} are not [H,I], [H,I], [I,H]")
        shapes.add(g)
    if len(shapes) != 1:
        raise Refuse(f"experts have different shapes {sorted(shapes)}")


def fuse_grouped_experts(model: ir.Model, log: FusionLog | None = None) -> int:
    """Fuse the experts behind every fused gating node; returns the number fused."""
    graph, count = model.graph, 0
    for gating in [n for n in graph if n.domain == MOEC_DOMAIN and n.op_type == OP_MOE_GATING]:
        try:
            dense, scatter, casts = _gated_dense(gating)
            k = int(attr(gating, "k", 1))
            users = consumers(dense)
            if users and all(u.op_type in ("Slice", "Gather") for u in users):
                num_experts = gating.inputs[0].shape[1] if gating.inputs[0].shape is not None else None
                if not isinstance(num_experts, int):
                    raise Refuse("the number of experts is not static")
                m = _match_unrolled(dense, num_experts)
                _check_unrolled_shapes(m["experts"])
            else:
                m = _match_dense(dense)
            pattern = [scatter, *casts, *m["nodes"]]
            check_private(m["nodes"], [m["out"]], set(pattern))
            if dense.is_graph_output() or any(u not in set(pattern) for u in consumers(dense)):
                raise Refuse(f"the dense score matrix {dense.name!r} has a consumer outside the pattern")
        except Refuse as e:
            if log is not None:
                log.refuse(NAME, gating, str(e))
            continue
        op = ops.OpBuilder()
        ids, scores = gating.outputs
        if "experts" in m:
            gu_t, d_t = _stacked(m["experts"], m["experts"][0][0][0].dtype)
            prefix = f"moe_experts_{count}"
            w_gu = ir.Value(name=f"{prefix}.w_gate_up_EHI2", shape=gu_t.shape, type=ir.TensorType(gu_t.dtype), const_value=gu_t)
            w_d = ir.Value(name=f"{prefix}.w_down_EIH", shape=d_t.shape, type=ir.TensorType(d_t.dtype), const_value=d_t)
            graph.register_initializer(w_gu)
            graph.register_initializer(w_d)
        else:
            w_gu, w_d = m["w_gate_up"], m["w_down"]
        y = ops.grouped_experts(op, m["x"], ids, scores, w_gu, w_d, k=k, score_on_input=m["score_on_input"])
        y.dtype = m["x"].dtype
        if m["base"] is not None:
            y = op.Add(m["base"], y)
        name_new_nodes(op.nodes, f"moe_experts_{count}")
        insert_and_replace(graph, m["before"], op.nodes, [m["out"]], [y])
        count += 1
    if count:
        remove_dead(model)
        ops.attach_functions(model)
        ops.remove_unused_functions(model)
    return count
