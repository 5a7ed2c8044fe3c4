"""The function bodies of moec's ops compute what passes/ops.py's schema says (NumPy reference)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from moec.passes import ops


def np_gating(logits, k, score_function, normalize):
    if score_function == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        vals = e / e.sum(-1, keepdims=True)
    else:
        vals = logits
    ids = np.argsort(-vals, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(vals, ids, -1)
    scores = 1 / (1 + np.exp(-top)) if score_function == "sigmoid" else top
    if normalize:
        scores = scores / scores.sum(-1, keepdims=True)
    return ids, scores


def np_experts(x, ids, scores, w_gu, w_d, score_on_input):
    out = np.zeros_like(x)
    inter = w_gu.shape[-1] // 2
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, s = ids[t, j], scores[t, j]
            h = x[t] * s if score_on_input else x[t]
            gu = h @ w_gu[e]
            a = gu[:inter] / (1 + np.exp(-gu[:inter])) * gu[inter:]
            y = a @ w_d[e]
            out[t] += y if score_on_input else s * y
    return out


def fused_model(E, H, I, k, score_function, normalize, score_on_input):
    logits = ir.val("logits", ir.DataType.FLOAT, ir.Shape(["T", E]))
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["T", H]))
    w_gu = ir.val("w_gu", ir.DataType.FLOAT, ir.Shape([E, H, 2 * I]))
    w_d = ir.val("w_d", ir.DataType.FLOAT, ir.Shape([E, I, H]))
    op = ops.OpBuilder()
    ids, scores = ops.moe_gating(op, logits, k=k, score_function=score_function, normalize=normalize)
    y = ops.grouped_experts(op, x, ids, scores, w_gu, w_d, k=k, score_on_input=score_on_input)
    y.name = "y"
    ids.name, scores.name = "ids", "scores"
    graph = ir.Graph([logits, x, w_gu, w_d], [ids, scores, y], nodes=op.nodes, opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    ops.attach_functions(model)
    return model


def run_ort(model: ir.Model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("k,score_function,normalize,score_on_input", [
    (1, "sigmoid", 0, 1), (2, "sigmoid", 1, 1), (2, "softmax", 1, 0), (3, "softmax", 0, 0),
])
def test_function_bodies_match_schema(k, score_function, normalize, score_on_input):
    E, H, I, T = 5, 8, 6, 7
    rng = np.random.default_rng(0)
    feeds = {
        "logits": rng.standard_normal((T, E)).astype(np.float32),
        "x": rng.standard_normal((T, H)).astype(np.float32),
        "w_gu": rng.standard_normal((E, H, 2 * I)).astype(np.float32) / 3,
        "w_d": rng.standard_normal((E, I, H)).astype(np.float32) / 3,
    }
    ids, scores, y = run_ort(fused_model(E, H, I, k, score_function, normalize, score_on_input), feeds)
    ref_ids, ref_scores = np_gating(feeds["logits"].astype(np.float64), k, score_function, normalize)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    ref_y = np_experts(feeds["x"].astype(np.float64), ref_ids, ref_scores, feeds["w_gu"].astype(np.float64),
                       feeds["w_d"].astype(np.float64), score_on_input)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)


def test_gather_builder_matches_dense_builder():
    E, H, I, T, k = 4, 8, 6, 5, 2
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((T, H)).astype(np.float32),
             "ids": np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64),
             "s": rng.random((T, k)).astype(np.float32),
             "w_gu": rng.standard_normal((E, H, 2 * I)).astype(np.float32),
             "w_d": rng.standard_normal((E, I, H)).astype(np.float32)}
    for soi in (0, 1):
        outs = []
        for build in (ops.build_experts_dense, ops.build_experts_gather):
            vals = [ir.val("x", ir.DataType.FLOAT, ir.Shape(["T", H])), ir.val("ids", ir.DataType.INT64, ir.Shape(["T", k])),
                    ir.val("s", ir.DataType.FLOAT, ir.Shape(["T", k])),
                    ir.val("w_gu", ir.DataType.FLOAT, ir.Shape([E, H, 2 * I])),
                    ir.val("w_d", ir.DataType.FLOAT, ir.Shape([E, I, H]))]
            op = ops.OpBuilder()
            y = build(op, *vals, score_on_input=soi)
            y.name = "y"
            g = ir.Graph(vals, [y], nodes=op.nodes, opset_imports={"": 20})
            (out,) = run_ort(ir.Model(g, ir_version=10), feeds)
            outs.append(out)
        ref = np_experts(*(feeds[n].astype(np.float64) if feeds[n].dtype != np.int64 else feeds[n]
                           for n in ("x", "ids", "s", "w_gu", "w_d")), soi)
        np.testing.assert_allclose(outs[0], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(outs[1], ref, rtol=1e-5, atol=1e-5)
