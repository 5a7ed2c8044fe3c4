"""One MoE layer alone on ONNX Runtime's CPU provider: four formulations of the same top-1 experts
at decode (1 token) and prefill (64 tokens), in small hand-built graphs (no moec passes involved).

- moe:    com.microsoft.MoE (the ``ort`` lowering's op; interleaved fc1 [E, 2I, H], fc2 [E, H, I])
- gather: Gather of the chosen experts' stacked weights, then batched MatMul (the ``gather`` lowering)
- tree:   per-expert weights, nested Ifs on the expert id (the ``split`` lowering's one-token branch)
- sorted: per-expert weights, NonZero/GatherND/MatMul/ScatterND per expert (``split``'s many-token branch)
- guarded: ``sorted`` with each expert's group inside an If on "some token chose it", so a
  one-token step runs one expert's nodes; each expert's weights feed one MatMul pair (one
  prepacked copy)
- split: If on T == 1 over ``tree`` and ``sorted`` (the ``split`` lowering); each expert's weights
  feed two MatMul pairs, so ORT prepacks them twice (``split-nopack``: with prepacking disabled)
- slices: tokens sorted by expert once a layer (TopK), per-expert offsets from one ReduceSum and
  one Split; per expert only a Slice of the sorted rows and the FFN; one Concat and one Gather
  by the inverse permutation (``split``'s form in issue 20's third round)
- moe-parts: com.microsoft.MoE with every expert cut in two slices of I, routed to both (``ort``'s form since the fourth
  round: one token's expert on two threads)
- cuts: sorted as in slices, then one Split of the rows by per-expert counts, per expert only its two MatMuls,
  one SwiGLU a layer on the concatenated gate-up rows and a second Split (``split``'s form since the fourth)

``FORMS=slices,sorted,moe`` in the environment builds only those forms (each holds its own weights);
``NOTE=...`` says what the host was doing.

    python benchmarks/ort_moe_layer_forms.py H I E THREADS REPEATS SPINNING(0|1) [TOKENS] [OUT_STEM]
    e.g. python benchmarks/ort_moe_layer_forms.py 1024 2048 16 2 100 0 1,64

Sessions are interleaved per repeat; medians and minima. Writes
benchmarks/results/ort_moe_layer_forms_H<H>_t<THREADS>.json and .md. Not a test.
"""
import json, os
from pathlib import Path
import sys, time, statistics, numpy as np, onnxruntime as ort
from onnx import helper as h, TensorProto as TP, numpy_helper as nh
H, I, E = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
w_gu = (rng.standard_normal((E, H, 2 * I)) * 0.02).astype(np.float32)
w_d = (rng.standard_normal((E, I, H)) * 0.02).astype(np.float32)
def ffn(nodes, inits, x, gu, d, p):
    nodes += [h.make_node("MatMul", [x, gu], [p+"gu"]), h.make_node("Split", [p+"gu"], [p+"g", p+"u"], axis=-1, num_outputs=2),
              h.make_node("Sigmoid", [p+"g"], [p+"sg"]), h.make_node("Mul", [p+"g", p+"sg"], [p+"a"]), h.make_node("Mul", [p+"a", p+"u"], [p+"m"]),
              h.make_node("MatMul", [p+"m", d], [p+"y"])]
    return p+"y"
def model(nodes, inits, outs="y"):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, ["T", H]), h.make_tensor_value_info("logits", TP.FLOAT, ["T", E])],
                     [h.make_tensor_value_info(outs, TP.FLOAT, None)], initializer=inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
def moe_weights():
    # com.microsoft.MoE's layout: fc1 [E, 2I, H] with gate and up rows interleaved, fc2 [E, H, I]
    fc1 = np.stack([w_gu[:, :, :I].transpose(0, 2, 1), w_gu[:, :, I:].transpose(0, 2, 1)], axis=2).reshape(E, 2 * I, H)
    return fc1, w_d.transpose(0, 2, 1)
def moe():
    fc1, fc2 = moe_weights()
    return model([h.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=1, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)],
                 [nh.from_array(np.ascontiguousarray(fc1), "fc1"), nh.from_array(np.ascontiguousarray(fc2), "fc2")])
def gather():
    n = [h.make_node("ArgMax", ["logits"], ["ids"], axis=1, keepdims=1), h.make_node("Gather", ["wgu", "ids"], ["wgu_t"]), h.make_node("Gather", ["wd", "ids"], ["wd_t"]),
         h.make_node("Constant", [], ["ax"], value=nh.from_array(np.array([1, 2], np.int64))), h.make_node("Unsqueeze", ["x", "ax"], ["x4"])]
    y = ffn(n, None, "x4", "wgu_t", "wd_t", "f_")
    n += [h.make_node("Constant", [], ["sh"], value=nh.from_array(np.array([-1, H], np.int64))), h.make_node("Reshape", [y, "sh"], ["y"])]
    return model(n, [nh.from_array(w_gu, "wgu"), nh.from_array(w_d, "wd")])
def per_expert_inits():
    return [nh.from_array(np.ascontiguousarray(w_gu[e]), f"wgu{e}") for e in range(E)] + [nh.from_array(np.ascontiguousarray(w_d[e]), f"wd{e}") for e in range(E)]
def tree():
    # T == 1 only: nested Ifs on the scalar id
    def sub(lo, hi, tag):
        if hi - lo == 1:
            n = []
            y = ffn(n, None, "x", f"wgu{lo}", f"wd{lo}", f"e{lo}_")
            n.append(h.make_node("Identity", [y], [f"o{tag}"]))
            return h.make_graph(n, f"leaf{lo}", [], [h.make_tensor_value_info(f"o{tag}", TP.FLOAT, None)])
        mid = (lo + hi) // 2
        n = [h.make_node("Constant", [], [f"m{tag}"], value=nh.from_array(np.array(mid, np.int64))), h.make_node("Less", ["id", f"m{tag}"], [f"c{tag}"]),
             h.make_node("If", [f"c{tag}"], [f"o{tag}"], then_branch=sub(lo, mid, tag + "l"), else_branch=sub(mid, hi, tag + "r"))]
        return h.make_graph(n, f"n{tag}", [], [h.make_tensor_value_info(f"o{tag}", TP.FLOAT, None)])
    g = sub(0, E, "t")
    n = [h.make_node("ArgMax", ["logits"], ["ids"], axis=1, keepdims=0), h.make_node("Constant", [], ["z"], value=nh.from_array(np.array([0], np.int64))),
         h.make_node("Squeeze", ["ids", "z"], ["id"])] + list(g.node) + [h.make_node("Identity", ["ot"], ["y"])]
    return model(n, per_expert_inits())
def sorted_():
    n = [h.make_node("ArgMax", ["logits"], ["ids"], axis=1, keepdims=0), h.make_node("Shape", ["x"], ["shx"]), h.make_node("ConstantOfShape", ["shx"], ["acc-1"])]
    for e in range(E):
        p = f"s{e}_"
        n += [h.make_node("Constant", [], [p+"e"], value=nh.from_array(np.array(e, np.int64))), h.make_node("Equal", ["ids", p+"e"], [p+"mask"]),
              h.make_node("NonZero", [p+"mask"], [p+"nz"]), h.make_node("Transpose", [p+"nz"], [p+"idx"], perm=[1, 0]),
              h.make_node("GatherND", ["x", p+"idx"], [p+"xe"])]
        y = ffn(n, None, p+"xe", f"wgu{e}", f"wd{e}", p)
        n.append(h.make_node("ScatterND", [f"acc{e-1}", p+"idx", y], [f"acc{e}"]))
    n.append(h.make_node("Identity", [f"acc{E-1}"], ["y"]))
    m = model(n, per_expert_inits())
    m.graph.node[2].attribute.append(h.make_attribute("value", nh.from_array(np.zeros(1, np.float32))))
    return m
def guarded():
    n = [h.make_node("ArgMax", ["logits"], ["ids"], axis=1, keepdims=0), h.make_node("Shape", ["x"], ["shx"]),
         h.make_node("ConstantOfShape", ["shx"], ["acc-1"], value=nh.from_array(np.zeros(1, np.float32)))]
    for e in range(E):
        p = f"s{e}_"
        body = [h.make_node("NonZero", [p+"mask"], [p+"nz"]), h.make_node("Transpose", [p+"nz"], [p+"idx"], perm=[1, 0]),
                h.make_node("GatherND", ["x", p+"idx"], [p+"xe"])]
        y = ffn(body, None, p+"xe", f"wgu{e}", f"wd{e}", p)
        body.append(h.make_node("ScatterND", [f"acc{e-1}", p+"idx", y], [p+"out"]))
        then = h.make_graph(body, f"then{e}", [], [h.make_tensor_value_info(p+"out", TP.FLOAT, None)])
        skip = h.make_graph([h.make_node("Identity", [f"acc{e-1}"], [p+"skip"])], f"else{e}", [],
                            [h.make_tensor_value_info(p+"skip", TP.FLOAT, None)])
        n += [h.make_node("Constant", [], [p+"e"], value=nh.from_array(np.array(e, np.int64))), h.make_node("Equal", ["ids", p+"e"], [p+"mask"]),
              h.make_node("Cast", [p+"mask"], [p+"m8"], to=TP.INT32), h.make_node("ReduceMax", [p+"m8"], [p+"any8"], keepdims=0),
              h.make_node("Cast", [p+"any8"], [p+"any"], to=TP.BOOL),
              h.make_node("If", [p+"any"], [f"acc{e}"], then_branch=then, else_branch=skip)]
    n.append(h.make_node("Identity", [f"acc{E-1}"], ["y"]))
    return model(n, per_expert_inits())
def split():
    t, s_ = tree(), sorted_()
    def sub(m, tag):
        # the two branches would both define "ids" and "y": give those their own names (the tree's
        # nested Ifs read only "id", which the sorted branch does not define)
        ren = {"ids": f"{tag}_ids", "y": f"{tag}_y"}
        nodes = []
        for nd in m.graph.node:
            c = h.make_node(nd.op_type, [ren.get(i, i) for i in nd.input], [ren.get(o, o) for o in nd.output], domain=nd.domain)
            c.attribute.extend(nd.attribute)
            nodes.append(c)
        return h.make_graph(nodes, tag, [], [h.make_tensor_value_info(f"{tag}_y", TP.FLOAT, None)])
    n = [h.make_node("Shape", ["x"], ["T"], start=0, end=1), h.make_node("Constant", [], ["one"], value=nh.from_array(np.array([1], np.int64))),
         h.make_node("Equal", ["T", "one"], ["is1v"]), h.make_node("Squeeze", ["is1v"], ["is1"]),
         h.make_node("If", ["is1"], ["y"], then_branch=sub(t, "tree"), else_branch=sub(s_, "sorted"))]
    return model(n, per_expert_inits())
def _const(name, v):
    return h.make_node("Constant", [], [name], value=nh.from_array(np.array(v, np.int64)))
def _sorted_rows(ids_vs_ar, ar):
    # tokens sorted by expert (TopK of the ids as floats), and per-expert counts or offsets: ReduceSum of
    # ids_vs_ar(ids_T1, ar) over the tokens
    return [h.make_node("ArgMax", ["logits"], ["ids"], axis=1, keepdims=0), h.make_node("Shape", ["x"], ["T"], start=0, end=1),
            h.make_node("Cast", ["ids"], ["idsf"], to=TP.FLOAT),
            h.make_node("TopK", ["idsf", "T"], ["sid", "order"], largest=0, sorted=1),
            h.make_node("Gather", ["x", "order"], ["xs"], axis=0),
            _const("u1", [1]), h.make_node("Unsqueeze", ["ids", "u1"], ["ids_T1"]), _const("ar", ar[None, :]),
            h.make_node(ids_vs_ar, ["ids_T1", "ar"], ["hit"]), h.make_node("Cast", ["hit"], ["hit64"], to=TP.INT64),
            _const("z", [0]), h.make_node("ReduceSum", ["hit64", "z"], ["cnt"], keepdims=0)]
def _unsorted(ys):
    # the inverse permutation: argsort of the order (TopK of it as floats, exact below 2**24 tokens)
    return [h.make_node("Concat", ys, ["ys"], axis=0), h.make_node("Cast", ["order"], ["order_f"], to=TP.FLOAT),
            h.make_node("TopK", ["order_f", "T"], ["_", "inv"], largest=0, sorted=1),
            h.make_node("Gather", ["ys", "inv"], ["y"], axis=0)]
def slices():
    # cnt[e] = how many tokens chose an expert below e: expert e's sorted rows are cnt[e]:cnt[e+1]
    n = _sorted_rows("Less", np.arange(E + 1)) + [h.make_node("Split", ["cnt"], [f"off{e}" for e in range(E + 1)], axis=0,
                                                              num_outputs=E + 1)]
    ys = []
    for e in range(E):
        p = f"s{e}_"
        n.append(h.make_node("Slice", ["xs", f"off{e}", f"off{e+1}", "z"], [p + "xe"]))
        ys.append(ffn(n, None, p + "xe", f"wgu{e}", f"wd{e}", p))
    return model(n + _unsorted(ys), per_expert_inits())
def cuts():
    # split's form since issue 20's fourth round: one Split of the sorted rows by per-expert counts, per
    # expert only the two MatMuls, one SwiGLU a layer on the concatenated gate-up rows, a second Split
    n = _sorted_rows("Equal", np.arange(E)) + [h.make_node("Split", ["xs", "cnt"], [f"x{e}" for e in range(E)], axis=0)]
    n += [h.make_node("MatMul", [f"x{e}", f"wgu{e}"], [f"gu{e}"]) for e in range(E)]
    n += [h.make_node("Concat", [f"gu{e}" for e in range(E)], ["gu"], axis=0),
          h.make_node("Split", ["gu"], ["g", "u"], axis=-1, num_outputs=2), h.make_node("Sigmoid", ["g"], ["sg"]),
          h.make_node("Mul", ["g", "sg"], ["a"]), h.make_node("Mul", ["a", "u"], ["m"]),
          h.make_node("Split", ["m", "cnt"], [f"m{e}" for e in range(E)], axis=0)]
    n += [h.make_node("MatMul", [f"m{e}", f"wd{e}"], [f"y{e}"]) for e in range(E)]
    return model(n + _unsorted([f"y{e}" for e in range(E)]), per_expert_inits())
def moe_parts():
    # the ort lowering since issue 20's fourth round: every expert cut in two slices of I (expert e's slices are
    # experts e and E + e), a one-hot router given twice, k = 2: ORT's CPU MoE hands each block of experts to its
    # own thread, so one token's expert runs on two threads; fc2 doubled for the two 0.5 route weights
    fc1, fc2 = moe_weights()
    fc2 = fc2 * 2
    fc1p = np.concatenate([fc1[:, :I], fc1[:, I:]], axis=0); fc2p = np.concatenate([fc2[:, :, :I // 2], fc2[:, :, I // 2:]], axis=0)
    n = [h.make_node("ArgMax", ["logits"], ["ids"], axis=1, keepdims=1), _const("ar", np.arange(E)[None, :]),
         h.make_node("Equal", ["ids", "ar"], ["eq"]), h.make_node("Cast", ["eq"], ["hot"], to=TP.FLOAT),
         h.make_node("Concat", ["hot", "hot"], ["hot2"], axis=1),
         h.make_node("MoE", ["x", "hot2", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=2, activation_type="swiglu",
                     swiglu_fusion=1, normalize_routing_weights=1)]
    return model(n, [nh.from_array(np.ascontiguousarray(fc1p), "fc1"), nh.from_array(np.ascontiguousarray(fc2p), "fc2")])
builders = {"moe": moe, "moe-parts": moe_parts, "gather": gather, "tree": tree, "sorted": sorted_, "guarded": guarded, "split": split, "split-nopack": split,
            "slices": slices, "cuts": cuts}
forms = {k: builders[k]() for k in os.environ.get("FORMS", "moe,gather,tree,sorted,guarded,split,split-nopack").split(",")}
threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
sess = {}
for k, m in forms.items():
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.add_session_config_entry("session.intra_op.allow_spinning", sys.argv[6] if len(sys.argv) > 6 else "1")
    if k.endswith("-nopack"):
        o.add_session_config_entry("session.disable_prepacking", "1")
    sess[k] = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
res = {}
for T in [int(t) for t in (sys.argv[7] if len(sys.argv) > 7 else "1,64").split(",")]:
    x = rng.standard_normal((T, H)).astype(np.float32); lg = rng.standard_normal((T, E)).astype(np.float32)
    ref = None
    times = {k: [] for k in sess}
    for r in range(int(sys.argv[5]) if len(sys.argv) > 5 else 30):
        for k, s in sess.items():
            if T > 1 and k == "tree": continue
            t = time.perf_counter(); y = s.run(None, {"x": x, "logits": lg})[0]; times[k].append(time.perf_counter() - t)
            if r == 0:
                ref = y if ref is None else ref
                print(T, k, "maxdiff", float(np.abs(y.reshape(ref.shape) - ref).max()))
    for k, v in times.items():
        if v:
            res[f"T={T} {k}"] = {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3}
            print(f"T={T} {k:7s} median {statistics.median(v)*1e3:7.3f} ms  min {min(v)*1e3:7.3f}")
out = {"H": H, "I": I, "E": E, "threads": threads, "repeats": max(len(v) for v in times.values()), "spinning": sys.argv[6] if len(sys.argv) > 6 else "1",
       "onnxruntime": ort.__version__, "loadavg_end": [round(x, 1) for x in os.getloadavg()],
       "note": os.environ.get("NOTE", "2-core host shared with 7 other engineers' jobs: indicative; minima are the least disturbed runs."),
       "results": res}
results = Path(__file__).parent / "results"
stem = sys.argv[8] if len(sys.argv) > 8 else f"ort_moe_layer_forms_H{H}_t{threads}"
(results / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
lines = [f"# One MoE layer on ONNX Runtime CPU: H {H}, I {I}, E {E}, top-1, {threads} thread(s)", "",
         f"onnxruntime {ort.__version__}, {out['repeats']} interleaved repeats, spinning {out['spinning']}, forms {', '.join(sess)}. "
         f"Host: {out['note']} Load average {out['loadavg_end']} at the end.", "",
         "| tokens / form | median ms | min ms |", "|---|---|---|"]
lines += [f"| {k} | {v['median_ms']:.3f} | {v['min_ms']:.3f} |" for k, v in res.items()]
(results / f"{stem}.md").write_text("\n".join(lines) + "\n")
