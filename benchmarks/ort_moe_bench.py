"""ONNX Runtime CPU: the unfused export vs each ORT-runnable MoE lowering, on a MoE-heavy model.

Model: Llama 4 layout with 16 experts, top-1, hidden 512, expert intermediate 1024, 4 layers (all
MoE), random weights (timing does not depend on the values). Workload: batch 1, prefill 128
tokens, then 32 greedy decode steps through moec's generation loop and OrtBackend (ORT's own graph
optimizations on, as a user runs it). Target: the optimized graph >= 5x faster per decode step
than the unfused export.

    python benchmarks/ort_moe_bench.py [--threads 1] [--repeats 3] [--work DIR]

Writes benchmarks/results/ort_moe.json and ort_moe.md. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LOWERINGS = ("ort", "hybrid", "gather", "dense", "function")
PROMPT_LEN, DECODE_STEPS = 128, 32


def bench_config():
    from moec.models import Llama4Config

    return Llama4Config.preset("llama4-tiny").replace(
        hidden_size=512, intermediate_size=1024, intermediate_size_mlp=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16,
        num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8192,
        max_position_embeddings=512,
    )


def run_once(path: Path, threads: int) -> dict:
    import numpy as np

    from moec.runtime.generate import GenerationConfig, generate
    from moec.runtime.ort_backend import OrtBackend

    backend = OrtBackend.from_onnx(path, intra_op_threads=threads)
    prompt = np.random.default_rng(0).integers(0, 256, size=(1, PROMPT_LEN)).tolist()
    generate(backend, [prompt[0][:8]], GenerationConfig(max_new_tokens=2, stop_on_eos=False))  # warm-up
    result = generate(backend, prompt, GenerationConfig(max_new_tokens=DECODE_STEPS + 1, stop_on_eos=False))
    return {"prefill_ms": result.prefill_s * 1e3,
            "decode_step_ms": statistics.median(result.decode_step_s) * 1e3,
            "tokens": result.new_tokens[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    import onnxruntime

    from moec.compiler.export import ExportConfig, export_onnx
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
    from moec.models.demo import write_demo_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="ort_moe_bench."))
    config = bench_config()
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        write_demo_checkpoint(ckpt, preset=config, seed=0)
    models = {"unfused": work / "unfused" / "model.onnx"}
    if not models["unfused"].exists():
        export_onnx(ckpt, models["unfused"], ExportConfig(dtype="fp32"))
    optimize_ms = {}
    for low in LOWERINGS:
        models[low] = work / low / "model.onnx"
        t = time.perf_counter()
        report = optimize_onnx(models["unfused"], models[low], OptimizeConfig(target="ort", moe_lowering=low))
        optimize_ms[low] = (time.perf_counter() - t) * 1e3
        assert report.fused_experts == len(config.moe_layer_indices()), report.refusals

    rows = {}
    for name, path in models.items():
        runs = [run_once(path, args.threads) for _ in range(args.repeats)]
        rows[name] = {
            "prefill_ms": min(r["prefill_ms"] for r in runs),
            "decode_step_ms": min(r["decode_step_ms"] for r in runs),
            "same_tokens_as_unfused": None,
            "tokens": runs[0]["tokens"],
        }
        print(f"{name:9s} prefill {rows[name]['prefill_ms']:8.1f} ms   decode/step {rows[name]['decode_step_ms']:7.2f} ms", flush=True)
    base = rows["unfused"]
    base_tokens = base["tokens"]
    for name, row in rows.items():
        row["decode_speedup"] = base["decode_step_ms"] / row["decode_step_ms"]
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["same_tokens_as_unfused"] = row.pop("tokens") == base_tokens
    out = {
        "model": {"num_local_experts": 16, "num_experts_per_tok": 1, "hidden_size": 512, "intermediate_size": 1024,
                  "num_hidden_layers": 4, "moe_layers": config.moe_layer_indices()},
        "workload": {"batch": 1, "prompt_tokens": PROMPT_LEN, "decode_steps": DECODE_STEPS,
                     "statistic": f"best of {args.repeats} runs; decode = median step of a run"},
        "env": {"onnxruntime": onnxruntime.__version__, "provider": "CPUExecutionProvider", "intra_op_threads": args.threads,
                "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "note": "shared 2-core host (other jobs running): timings are indicative"},
        "optimize_ms": optimize_ms,
        "results": rows,
        "target": "optimized >= 5x faster per decode step than unfused",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ort_moe.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# ONNX Runtime CPU: unfused export vs MoE lowerings", "",
             f"16 experts, top-1, hidden 512, expert intermediate 1024, 4 MoE layers; batch 1, prefill {PROMPT_LEN}, "
             f"{DECODE_STEPS} decode steps; onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), "
             f"best of {args.repeats}. Shared 2-core host: indicative.", "",
             "| graph | prefill ms | decode ms/step | decode speedup | prefill speedup | same tokens |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['prefill_ms']:.1f} | {r['decode_step_ms']:.2f} | {r['decode_speedup']:.1f}x | "
                     f"{r['prefill_speedup']:.2f}x | {r['same_tokens_as_unfused']} |")
    (RESULTS / "ort_moe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
