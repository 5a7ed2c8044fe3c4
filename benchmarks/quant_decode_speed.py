"""ONNX Runtime CPU decode per token: int4 / int8 experts (com.microsoft.QMoE) vs the fp32 fused
graph (com.microsoft.MoE), on a MoE model, with llama.cpp's f32 / Q8_0 / Q4_0 of the same weights
as the peer (llama-cpp-python; a benchmark-only dependency).

Model: Llama 4 layout, 4 experts of hidden 2048 x intermediate 2048, top-1, 4 layers (all MoE),
tiny vocab, random weights (timing does not depend on the values). Workload: batch 1, prefill 32
tokens, 32 greedy decode steps (moec's generation loop for ONNX Runtime, ORT's graph optimizations
on, as a user runs it), 1 and 2 threads. Per thread count every contender is loaded once in this
process and the rounds interleave them (the order rotates), so a load spike hits all alike; the
figure is the median over rounds of each round's median step.

Expected before measuring (rewritten 2026-12-02 03:45 UTC, before the quiet-host run): a decode step
reads about 568 MB in fp32: per layer attention 42 MB, the shared expert 50 MB and the one chosen
routed expert 50 MB, plus tiny embeddings. ``--quantize-scope experts`` (the default) makes only the
routed expert int4 (50 -> 6.6 MB), so the step reads about 394 MB: at the bandwidth limit that is
1.45x, not the issue's 2x, whatever the kernel. Expected: int4-g128 experts 1.3-1.45x at 2 threads
(less at 1 thread if QMoE's dequantization is compute-bound), int8 experts 1.2-1.3x; int4-g32 with
``--quantize-scope all`` (every MatMul int4, llama.cpp Q4_0's scope and block size) 3-5x; llama.cpp
Q4_0 about 5x its own f32 (a step reads ~80 MB), and moec int4-g32-all within 1.5x of llama.cpp
Q4_0.

    python benchmarks/quant_decode_speed.py [--rounds 5] [--work DIR] [--converter DIR]

``--converter``: a llama.cpp tree with convert_hf_to_gguf.py (see ort_vs_llamacpp.py); without it
or without llama_cpp installed, the llama.cpp rows are left out. Writes
benchmarks/results/quant_decode_speed.json and .md. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT_LEN, DECODE_STEPS = 32, 32
# The ort target's default lowering for each (split: per-expert MatMul / MatMulNBits, issue 20), and
# "-moe" rows with com.microsoft.MoE / QMoE (the default before) for the same quantization.
GRAPHS = {"fp32": {}, "fp32-moe": dict(moe_lowering="ort"),
          "int4-g128": dict(quantize="int4", quantize_group=128),
          "int4-g128-moe": dict(quantize="int4", quantize_group=128, moe_lowering="ort"),
          "int4-g128-mlp": dict(quantize="int4", quantize_group=128, quantize_scope="mlp"),
          "int8": dict(quantize="int8"), "int8-moe": dict(quantize="int8", moe_lowering="ort"),
          "int4-g32-all": dict(quantize="int4", quantize_group=32, quantize_scope="all"),
          # int8 activations at run time (MatMulNBits accuracy_level 4)
          "int4-g128-a8": dict(quantize="int4", quantize_group=128, quantize_activations="dynamic"),
          "int4-g128-mlp-a8": dict(quantize="int4", quantize_group=128, quantize_scope="mlp", quantize_activations="dynamic"),
          "int4-g32-all-a8": dict(quantize="int4", quantize_group=32, quantize_scope="all", quantize_activations="dynamic")}
GGUFS = {"llama.cpp-f32": None, "llama.cpp-Q8_0": "MOSTLY_Q8_0", "llama.cpp-Q4_0": "MOSTLY_Q4_0"}


def bench_config():
    from moec.models import Llama4Config

    # floor_scale 8192 as in the real Llama 4 (llama.cpp hard-codes it) and interleave step 1 (llama.cpp
    # takes the MoE layers from the step, not from moe_layers): the same model in both. 4 layers: with
    # 2, both are chunked-attention layers and llama.cpp aborts ("tensor buffer not set": its
    # full-attention KV cache has no layer); layer 3 is the NoPE, full-attention one.
    return Llama4Config.preset("llama4-tiny").replace(
        hidden_size=2048, intermediate_size=2048, intermediate_size_mlp=2048, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_local_experts=4, moe_layers=[0, 1, 2, 3],
        interleave_moe_layer_step=1,
        attention_chunk_size=8192, max_position_embeddings=256, floor_scale=8192)


def ort_runner(path: Path, threads: int):
    from moec.runtime.generate import GenerationConfig, generate
    from moec.runtime.ort_backend import OrtBackend

    backend = OrtBackend.from_onnx(path, intra_op_threads=threads)

    def run(prompt):
        r = generate(backend, [prompt], GenerationConfig(max_new_tokens=DECODE_STEPS + 1, stop_on_eos=False))
        return r.prefill_s, statistics.median(r.decode_step_s)
    return run


def llamacpp_runner(gguf: Path, vocab: int, threads: int):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=128,
                n_batch=PROMPT_LEN, n_ubatch=PROMPT_LEN, verbose=False)

    def last_argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))))

    def run(prompt):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_argmax()
        prefill, steps = time.perf_counter() - t0, []
        for _ in range(DECODE_STEPS):
            t0 = time.perf_counter()
            llm.eval([tok])
            tok = last_argmax()
            steps.append(time.perf_counter() - t0)
        return prefill, statistics.median(steps)
    return run


def prepare(work: Path, converter: Path | None) -> tuple[dict, dict, dict]:
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
    from moec.models.demo import write_demo_checkpoint

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        write_demo_checkpoint(ckpt, preset=bench_config(), seed=0)
    export = work / "export" / "model.onnx"
    if not export.exists():
        # 1.1 GB inline: moec's export of external data fails its own check on this version (small
        # int64 constants are externalized and data_prop shape inference cannot read them back).
        export_onnx(ckpt, export, ExportConfig(dtype="fp32", max_batch=2, external_data_threshold_bytes=1_900_000_000))
    graphs, lowerings = {}, {}
    for name, quant in GRAPHS.items():
        graphs[name] = work / name / "model.onnx"
        record = work / name / "lowering.json"  # a rerun measures the graphs already written
        if not record.exists():
            rep = optimize_onnx(export, graphs[name], OptimizeConfig(target="ort", **quant))
            record.write_text(json.dumps(rep.moe_lowering))
        lowerings[name] = json.loads(record.read_text())
    ggufs = {}
    if converter is not None:
        import llama_cpp

        sys.path.insert(0, str(Path(__file__).parent))
        from ort_vs_llamacpp import convert_to_gguf

        f32 = work / "model-f32.gguf"
        if not f32.exists():
            convert_to_gguf(ckpt, f32, converter)
        for name, ftype in GGUFS.items():
            ggufs[name] = f32 if ftype is None else work / f"model-{name.split('-')[1]}.gguf"
            if ftype is not None and not ggufs[name].exists():
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
                params.nthread = 2
                rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(ggufs[name]).encode(), params)
                assert rc == 0, f"llama_model_quantize {ftype}: {rc}"
    return graphs, lowerings, ggufs


def measure(graphs: dict, ggufs: dict, threads: int, rounds: int, vocab: int) -> dict:
    import numpy as np

    runners = {name: ort_runner(path, threads) for name, path in graphs.items()}
    runners |= {name: llamacpp_runner(path, vocab, threads) for name, path in ggufs.items()}
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, vocab, PROMPT_LEN)]
    for run in runners.values():
        run(prompt[:8])  # warm-up: first runs allocate
    names, results = list(runners), {name: [] for name in runners}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(runners[name](prompt))
    return {name: {"prefill_ms": round(statistics.median(p for p, _ in rs) * 1e3, 2),
                   "decode_step_ms": round(statistics.median(d for _, d in rs) * 1e3, 3),
                   "decode_step_ms_min": round(min(d for _, d in rs) * 1e3, 3)} for name, rs in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--converter", type=Path, default=None, help="llama.cpp source tree with convert_hf_to_gguf.py")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--graphs", default=",".join(GRAPHS), help="which moec graphs (default: all)")
    ap.add_argument("--out-stem", default="quant_decode_speed")
    ap.add_argument("--note", default="2-core host shared with other engineers; measured holding the shared "
                    "benchmark lock (no other timed job), other jobs ran at nice 19.")
    args = ap.parse_args()
    import onnxruntime

    warnings.simplefilter("ignore")
    try:
        import llama_cpp
    except ImportError:
        llama_cpp, args.converter = None, None
    work = args.work or Path(tempfile.mkdtemp(prefix="quant_decode_speed."))
    if unknown := set(args.graphs.split(",")) - set(GRAPHS):
        raise SystemExit(f"unknown --graphs {sorted(unknown)}; known: {list(GRAPHS)}")
    for name in set(GRAPHS) - set(args.graphs.split(",")):
        del GRAPHS[name]
    graphs, lowerings, ggufs = prepare(work, args.converter)
    if args.prepare_only:
        return
    vocab = bench_config().vocab_size
    rows = []
    for threads in (1, 2):
        load_start = os.getloadavg()
        figures = measure(graphs, ggufs, threads, args.rounds, vocab)
        load = {"loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
        for name, fig in figures.items():
            rows.append({"graph": name, "lowering": lowerings.get(name, {"llama.cpp": 1}), "threads": threads,
                         **fig, **load})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["threads"]: r["decode_step_ms"] for r in rows if r["graph"] == "fp32"}
    peer = {r["threads"]: r["decode_step_ms"] for r in rows if r["graph"] == "llama.cpp-Q4_0"}
    for r in rows:
        r["decode_speedup_vs_fp32"] = round(base[r["threads"]] / r["decode_step_ms"], 2)
        if r["threads"] in peer:
            r["decode_vs_llamacpp_q4_0"] = round(peer[r["threads"]] / r["decode_step_ms"], 2)
    out = {"model": {"num_local_experts": 4, "hidden_size": 2048, "intermediate_size": 2048, "layers": 4,
                     "moe_layers": [0, 1, 2, 3], "top_k": 1},
           "workload": {"batch": 1, "prompt_tokens": PROMPT_LEN, "decode_steps": DECODE_STEPS,
                        "statistic": f"{args.rounds} interleaved rounds; decode = median over rounds of a run's median step"},
           "env": {"onnxruntime": onnxruntime.__version__, "llama_cpp_python": getattr(llama_cpp, "__version__", None),
                   "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "note": args.note},
           "target": "int4 experts >= 2x faster per decode step than fp32 fused", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out_stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# ONNX Runtime CPU decode: int4 / int8 experts vs fp32 fused, llama.cpp as the peer", "",
             f"4 experts of 2048 x 2048, top-1, 4 MoE layers; batch 1, prefill {PROMPT_LEN}, {DECODE_STEPS} decode steps; "
             f"onnxruntime {onnxruntime.__version__}, llama-cpp-python {out['env']['llama_cpp_python']}; "
             f"{args.rounds} interleaved rounds, medians (min in brackets). Host: {args.note}", "",
             "| graph | lowering | threads | prefill ms | decode ms/step | speedup vs fp32 | vs llama.cpp Q4_0 | load avg start -> end |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low = ", ".join(f"{k} x{v}" for k, v in r["lowering"].items())
        vs = f"{r['decode_vs_llamacpp_q4_0']:.2f}x" if "decode_vs_llamacpp_q4_0" in r else "-"
        lines.append(f"| {r['graph']} | {low} | {r['threads']} | {r['prefill_ms']:.1f} | {r['decode_step_ms']:.2f} "
                     f"({r['decode_step_ms_min']:.2f}) | {r['decode_speedup_vs_fp32']:.2f}x | {vs} | "
                     f"{r['loadavg_start'][0]} -> {r['loadavg_end'][0]} |")
    (RESULTS / f"{args.out_stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
