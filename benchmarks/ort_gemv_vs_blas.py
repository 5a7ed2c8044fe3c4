"""One-token fp32 GEMV on ONNX Runtime's CPU kernels (MLAS) against numpy's BLAS and torch, same weights.

A decode step of a memory-bound model is a chain of [1, K] x [K, N] products, so how fast one kernel
streams a weight matrix bounds every lowering. Forms, interleaved per round in one process:
- ort-matmul: MatMul with the [K, N] weight as an initializer (prepacked by ONNX Runtime), what
  moec's graphs run; ``-nopack``: with session.disable_prepacking
- ort-gemm-t: Gemm with the weight stored [N, K] and transB = 1 (``-nopack`` likewise)
- numpy: ``x @ W`` (numpy's BLAS, OpenBLAS in the PyPI wheel)
- torch: ``torch.nn.functional.linear`` on the [N, K] weight
ONNX Runtime sessions run with intra-op spinning off, so that their idle pool threads do not take a core
from the next form in the round; all forms use 2 threads.

Two schedules, each interleaving the forms with the order rotating per round:
- back-to-back: each form starts as soon as the one before returns. numpy's OpenBLAS worker threads
  busy-wait after a call (OpenBLAS's THREAD_TIMEOUT, about 2^28 cycles) and torch's OpenMP threads spin
  too, so on a 2-core host the form after them runs with one core taken: this schedule overstates
  the cost of whatever follows numpy or torch.
- settled: a pause of SETTLE_S before each timed call, longer than those spin tails, so each form
  has both cores.

    python benchmarks/ort_gemv_vs_blas.py [K N MATRICES ROUNDS]     (default 1024 4096 16 30)

Writes benchmarks/results/ort_gemv_vs_blas.json and .md. Not a test.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

THREADS = 2
SETTLE_S = 0.3  # > OpenBLAS's busy-wait after a call (2^28 cycles, about 0.1 s at 2.5 GHz)


def session(weights_KN: list[np.ndarray], transposed: bool, prepack: bool) -> ort.InferenceSession:
    K = weights_KN[0].shape[0]
    nodes, inits = [], []
    for i, w in enumerate(weights_KN):
        if transposed:
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}"], [f"y{i}"], transB=1))
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
        else:
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
            inits.append(numpy_helper.from_array(w, f"w{i}"))
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(nodes))],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def timed(forms: dict, rounds: int, pause_s: float, mb: float) -> dict:
    times: dict[str, list[float]] = {k: [] for k in forms}
    for r in range(rounds):
        names = list(forms)
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(pause_s)
            t0 = time.perf_counter()
            forms[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                "GBps_at_median": mb / statistics.median(v) / 1e3} for k, v in times.items()}


def main() -> None:
    K, N, L, rounds = (int(a) for a in (sys.argv[1:5] if len(sys.argv) > 4 else (1024, 4096, 16, 30)))
    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((K, N)) * 0.02).astype(np.float32) for _ in range(L)]
    x = rng.standard_normal((1, K)).astype(np.float32)
    sessions = {"ort-matmul": session(weights, False, True), "ort-matmul-nopack": session(weights, False, False),
                "ort-gemm-t": session(weights, True, True), "ort-gemm-t-nopack": session(weights, True, False)}
    weights_NK = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in weights]
    x_t = torch.from_numpy(x)
    forms = {name: (lambda s=s: s.run(None, {"x": x})) for name, s in sessions.items()}
    forms["numpy"] = lambda: [x @ w for w in weights]
    forms["torch"] = lambda: [torch.nn.functional.linear(x_t, w) for w in weights_NK]
    ref = np.concatenate([x @ w for w in weights], axis=1)
    for name, f in forms.items():  # same numbers from every form
        out = np.concatenate([np.asarray(y) for y in f()], axis=1)
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), name
    mb = K * N * L * 4 / 1e6
    schedules = {"back-to-back": 0.0, "settled": SETTLE_S}
    table = {sched: timed(forms, rounds, pause, mb) for sched, pause in schedules.items()}
    out = {"K": K, "N": N, "matrices": L, "MB": mb, "rounds": rounds, "threads": THREADS, "settle_s": SETTLE_S,
           "onnxruntime": ort.__version__, "numpy": np.__version__, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "note": os.environ.get("NOTE", ""),
           "loadavg_end": [round(v, 2) for v in os.getloadavg()], "schedules": table}
    results = Path(__file__).parent / "results"
    (results / "ort_gemv_vs_blas.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# One-token fp32 GEMV: {L} weights of {K} x {N} ({mb:.0f} MB) a round, {THREADS} threads", "",
             f"onnxruntime {ort.__version__}, numpy {np.__version__}, torch {torch.__version__}; {rounds} interleaved "
             f"rounds per schedule (settled: {SETTLE_S} s pause before each call). {out['note']} "
             f"Load average {out['loadavg_end']} at the end.", "",
             "| form | back-to-back median ms | min ms | settled median ms | min ms | GB/s settled |",
             "|---|---|---|---|---|---|"]
    b2b, settled = table["back-to-back"], table["settled"]
    lines += [f"| {k} | {b2b[k]['median_ms']:.2f} | {b2b[k]['min_ms']:.2f} | {settled[k]['median_ms']:.2f} | "
              f"{settled[k]['min_ms']:.2f} | {settled[k]['GBps_at_median']:.1f} |" for k in forms]
    (results / "ort_gemv_vs_blas.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
