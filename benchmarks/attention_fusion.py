"""Does ONNX Attention (opset 23) pay on ONNX Runtime CPU for moec's attention? (not a test)

The demo export's attention core is softmax(q k^T * scale + mask) v with GQA written as
Unsqueeze/Expand/Reshape of k and v, and a mask from position ids (so is_causal cannot replace it:
the fused op keeps attn_mask). This times that unfused chain against one ONNX Attention node with
the same 4D inputs and the same additive mask, ORT graph optimizations on (what users run) and off.
Run: OMP_NUM_THREADS=1 python benchmarks/attention_fusion.py > benchmarks/attention_fusion.txt
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h

B, N, K, D = 1, 32, 8, 128


def unfused() -> onnx.ModelProto:
    g = N // K
    nodes = [
        h.make_node("Unsqueeze", ["k", "ax2"], ["k5"]), h.make_node("Shape", ["k"], ["ks"]),
        h.make_node("Gather", ["ks", "i2"], ["T"]),
        h.make_node("Concat", ["b1", "kk", "gg", "T", "dd"], ["eshape"], axis=0),
        h.make_node("Expand", ["k5", "eshape"], ["ke"]),
        h.make_node("Concat", ["b1", "nn", "T", "dd"], ["rshape"], axis=0),
        h.make_node("Reshape", ["ke", "rshape"], ["kr"]),
        h.make_node("Unsqueeze", ["v", "ax2"], ["v5"]), h.make_node("Expand", ["v5", "eshape"], ["ve"]),
        h.make_node("Reshape", ["ve", "rshape"], ["vr"]),
        h.make_node("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]),
        h.make_node("MatMul", ["q", "kt"], ["s"]), h.make_node("Mul", ["s", "scale"], ["ss"]),
        h.make_node("Add", ["ss", "mask"], ["sm"]), h.make_node("Softmax", ["sm"], ["p"], axis=-1),
        h.make_node("MatMul", ["p", "vr"], ["y"]),
    ]
    inits = [h.make_tensor("ax2", TP.INT64, [1], [2]), h.make_tensor("i2", TP.INT64, [1], [2]),
             h.make_tensor("b1", TP.INT64, [1], [B]), h.make_tensor("kk", TP.INT64, [1], [K]),
             h.make_tensor("gg", TP.INT64, [1], [g]), h.make_tensor("dd", TP.INT64, [1], [D]),
             h.make_tensor("nn", TP.INT64, [1], [N]), h.make_tensor("scale", TP.FLOAT, [], [D**-0.5])]
    return _model(nodes, inits)


def fused() -> onnx.ModelProto:
    nodes = [h.make_node("Attention", ["q", "k", "v", "mask"], ["y"], scale=D**-0.5)]
    return _model(nodes, [])


def _model(nodes, inits) -> onnx.ModelProto:
    ins = [h.make_tensor_value_info("q", TP.FLOAT, [B, N, "S", D]), h.make_tensor_value_info("k", TP.FLOAT, [B, K, "T", D]),
           h.make_tensor_value_info("v", TP.FLOAT, [B, K, "T", D]), h.make_tensor_value_info("mask", TP.FLOAT, [B, 1, "S", "T"])]
    out = [h.make_tensor_value_info("y", TP.FLOAT, [B, N, "S", D])]
    return h.make_model(h.make_graph(nodes, "attn", ins, out, inits), opset_imports=[h.make_opsetid("", 23)])


def bench(model: onnx.ModelProto, feeds: dict, level) -> tuple[float, np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, feeds)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        sess.run(None, feeds)
    return (time.perf_counter() - t0) / reps * 1e3, y


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, CPU, 1 thread; B={B} N={N} K={K} D={D}; ms per call (20 calls)")
    print("case            S     T   unfused  fused(Attention)  max|diff|  [ORT graph opts]")
    for S, T in ((1, 512), (1, 2048), (128, 128), (512, 512)):
        q = rng.standard_normal((B, N, S, D)).astype(np.float32)
        k = rng.standard_normal((B, K, T, D)).astype(np.float32)
        v = rng.standard_normal((B, K, T, D)).astype(np.float32)
        qpos, kpos = np.arange(T - S, T)[:, None], np.arange(T)[None]
        chunk = 64
        ok = (kpos <= qpos) & (kpos // chunk == qpos // chunk)  # chunked causal (RoPE layers)
        mask = np.where(ok, 0, np.finfo(np.float32).min).astype(np.float32)[None, None]
        feeds = {"q": q, "k": k, "v": v, "mask": mask}
        for name, level in (("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL), ("off", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
            tu, yu = bench(unfused(), feeds, level)
            tf, yf = bench(fused(), feeds, level)
            kind = "decode" if S == 1 else "prefill"
            print(f"{kind:10s} {S:6d} {T:5d} {tu:9.3f} {tf:12.3f}      {float(np.abs(yu - yf).max()):.1e}  [{name}]")


if __name__ == "__main__":
    main()
