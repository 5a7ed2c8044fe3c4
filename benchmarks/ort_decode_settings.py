"""Step-2 checks of issue 20 on one model folder (the graphs ort_vs_llamacpp.py writes): per-step
overhead of OrtBackend.forward over the bare session run (same IO binding), graph optimization level,
thread spinning, thread count, and an ORT profile of a decode step by op type. Sessions interleaved
in one process.

    python benchmarks/ort_decode_settings.py WORK_DIR ROUNDS OUT.json [GRAPH/LEVEL/THREADS/SPIN ...]

Without variants it measures the five of ort_decode_settings_h512.md (graph folders ort and split). Works on graphs
with GroupQueryAttention rings too: their cache is updated in place, so every loop carries the cache it got back.
The markdown (benchmarks/results/ort_decode_settings_<config>.md) is written by hand from OUT.json. Not a test.
"""
import sys, json, time, statistics, collections, numpy as np, onnxruntime as ort
from moec.runtime.ort_backend import OrtBackend
from moec.common import contract
work, rounds = sys.argv[1], int(sys.argv[2])
L = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "ext": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
variants = [("ort", "all", 2, "1"), ("split", "all", 2, "1"), ("split", "basic", 2, "1"), ("split", "all", 2, "0"), ("split", "all", 1, "1")]
if len(sys.argv) > 4:
    variants = [(g, lvl, int(th), spin) for g, lvl, th, spin in (v.split("/") for v in sys.argv[4:])]
bs = {}
for g, lvl, th, spin in variants:
    b = OrtBackend.from_onnx(f"{work}/{g}/model.onnx", intra_op_threads=th)
    o = ort.SessionOptions(); o.graph_optimization_level = L[lvl]; o.intra_op_num_threads = th
    o.add_session_config_entry("session.intra_op.allow_spinning", spin)
    b.session = ort.InferenceSession(f"{work}/{g}/model.onnx", sess_options=o, providers=["CPUExecutionProvider"])
    bs[(g, lvl, th, spin)] = b
prompt = np.arange(3, 67, dtype=np.int64)[None]
res = {k: {"fwd": [], "raw": [], "pre": []} for k in bs}
for r in range(rounds):
    for k, b in bs.items():
        c = b.init_cache(1)
        t = time.perf_counter(); _, c = b.forward(prompt, np.arange(64)[None], c); res[k]["pre"].append(time.perf_counter() - t)
        for s in range(12):
            t = time.perf_counter(); lg, c = b.forward(np.array([[5]]), np.array([[64 + s]]), c); res[k]["fwd"].append(time.perf_counter() - t)
        # the session alone on the same inputs, bindings made beforehand: what forward adds around it
        # (a ring layer's past is bound as its present too, as forward binds it: each run rewrites slot 76)
        binding = b.session.io_binding()
        binding.bind_cpu_input(contract.INPUT_IDS, np.array([[5]])); binding.bind_cpu_input(contract.POSITION_IDS, np.array([[76]]))
        for i in range(b.num_layers):
            binding.bind_ortvalue_input(contract.past_key(i), c.keys[i]); binding.bind_ortvalue_input(contract.past_value(i), c.values[i])
        binding.bind_output(contract.LOGITS, "cpu")
        for i in range(b.num_layers):
            for name, value in ((contract.present_key(i), c.keys[i]), (contract.present_value(i), c.values[i])):
                if i in b._in_place: binding.bind_ortvalue_output(name, value)
                else: binding.bind_output(name, "cpu")
        for s in range(12):
            t = time.perf_counter(); b.session.run_with_iobinding(binding); res[k]["raw"].append(time.perf_counter() - t)
out = {}
for k, v in res.items():
    out["/".join(map(str, k))] = {m: round(statistics.median(x) * 1e3, 3) for m, x in v.items()} | {"fwd_min": round(min(v["fwd"]) * 1e3, 3)}
    print("/".join(map(str, k)), out["/".join(map(str, k))], flush=True)
for g in sorted({k[0] for k in bs if k[1:] == ("all", 2, "1")}):
    o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.enable_profiling = True; o.profile_file_prefix = f"/tmp/prof_{g}"
    b = bs[(g, "all", 2, "1")]
    b.session = ort.InferenceSession(f"{work}/{g}/model.onnx", sess_options=o, providers=["CPUExecutionProvider"])
    c = b.init_cache(1); _, c = b.forward(prompt, np.arange(64)[None], c)
    for s in range(30):
        _, c = b.forward(np.array([[5]]), np.array([[64 + s]]), c)
    f = b.session.end_profiling()
    ev = [e for e in json.load(open(f)) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = [e for e in json.load(open(f)) if e.get("name") == "model_run"]
    runs.sort(key=lambda e: e["ts"]); cut = runs[1]["ts"]; n = len(runs) - 1  # drop the prefill run
    by = collections.Counter()
    for e in ev:
        if e["ts"] >= cut: by[e["args"]["op_name"]] += e["dur"]
    step = statistics.median(e["dur"] for e in runs[-30:]) / 1e3
    print(g, "model_run median ms", round(step, 3), "kernel ms/run by op:", {k: round(v / n / 1e3, 3) for k, v in by.most_common(10)}, "sum kernels", round(sum(by.values()) / n / 1e3, 3), flush=True)
    out[f"profile_{g}"] = {"model_run_ms": step, "by_op_ms": {k: round(v / n / 1e3, 3) for k, v in by.most_common(12)}}
json.dump(out, open(sys.argv[3], "w"), indent=1)
