"""KV memory and decode cost with ring caches on the chunked layers (issue 14).

Writes benchmarks/results/long_context_kv.{json,md}:

1. A small config (4 layers: 3 chunked with chunk C = 128, 1 NoPE; 2 kv heads x 64 dims, fp32),
   exported twice (chunked_cache ring and full). For contexts 1x, 4x, 16x C: prefill in chunks of
   C, then decode steps on ONNX Runtime CPU, each context in a fresh process: KV bytes held (the
   cache OrtValues' shapes), peak RSS, decode time per token, and ORT's profiler time of the
   self_attn nodes per layer kind (graph optimizations off so node names keep their layer).
2. The real Scout and Maverick configs (../shared/llama4-configs; layers, kv heads, head dim,
   chunk and NoPE pattern kept, hidden/vocab/experts shrunk): exported with max_seq 1 M, KV bytes
   per sequence at 128 K and 1 M tokens from the graph's input shapes (bf16), next to the figure
   of full caches on every layer.

Expected before measuring: chunked layers' KV flat at 3 x C x 2 x 2 x 64 x 4 B = 384 KiB per
sequence at every context, NoPE's growing linearly (16x from 1x to 16x); peak RSS grows only by
the NoPE share plus the prefill's transient; chunked layers' attention time per decode token
flat (C + 1 keys at any context) while the NoPE layer's grows ~16x. Real configs: 36 of 48
layers chunked, so at 1 M tokens KV is 12/48 + 36 x 8192 / (48 x 1 M) of full, about 0.25x.

Usage: python benchmarks/long_context_kv.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# ../shared/llama4-configs from the main checkout (/work/main) or a worktree (/work/wt/NAME).
CONFIGS = next((p / "shared" / "llama4-configs" for p in Path(__file__).resolve().parents[1:4]
                if (p / "shared" / "llama4-configs").is_dir()), Path("../shared/llama4-configs"))
CHUNK = 128


def small_config():
    from moec.models.config import PRESETS

    base = PRESETS["llama4-tiny"]
    return dataclasses.replace(base, attention_chunk_size=CHUNK, head_dim=64, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=16 * CHUNK + 64)


def run_context(onnx_path: str, context: int, decode: int) -> dict:
    """One context in this process (called in a child, so ru_maxrss is this run's peak)."""
    import numpy as np
    import onnxruntime as ort

    from moec.common.sidecar import read_sidecar
    from moec.runtime.ort_backend import OrtBackend

    def session(profile: bool):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"moec_lc_{os.getpid()}")
        return ort.InferenceSession(onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])

    sidecar = read_sidecar(onnx_path)
    be = OrtBackend(session(False), Path(onnx_path), sidecar, graph_optimization=False)
    ids = np.random.default_rng(0).integers(0, 256, size=(1, context))
    cache = be.init_cache(1)
    for start in range(0, context, CHUNK):
        n = min(CHUNK, context - start)
        logits, cache = be.forward(ids[:, start:start + n], np.arange(start, start + n)[None], cache)
    pos, step_s = context, []
    for _ in range(decode):
        token = logits[:, -1].argmax(-1)[:, None]
        t0 = time.perf_counter()
        logits, cache = be.forward(token, np.array([[pos]]), cache)
        step_s.append(time.perf_counter() - t0)
        pos += 1
    # Split by the layer's attention (chunked or NoPE), whatever cache the export gave it.
    config = small_config()
    kind_of = {i: "chunked" if config.uses_chunked_attention(i) else "full" for i in range(config.num_hidden_layers)}
    kv = {"chunked": 0, "full": 0}
    for c, k, v in zip(be.kv_cache, cache.keys, cache.values):
        kv[kind_of[c.layer]] += int(np.prod(k.shape())) * 4 + int(np.prod(v.shape())) * 4
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # Profile a few decode steps with the same cache: self_attn node time per layer kind.
    layer_of = _attention_node_layers(onnx_path)
    prof_sess = session(True)
    prof = OrtBackend(prof_sess, Path(onnx_path), sidecar, graph_optimization=False)
    steps = 8
    for _ in range(steps + 1):  # the first run (allocations of a new session) is left out below
        token = logits[:, -1].argmax(-1)[:, None]
        logits, cache = prof.forward(token, np.array([[pos]]), cache)
        pos += 1
    trace = json.loads(Path(prof_sess.end_profiling()).read_text())
    attn_us = {"chunked": 0.0, "full": 0.0}
    kinds = kind_of
    runs = sorted(ev["ts"] for ev in trace if ev.get("name") == "model_run")
    after_first = runs[1] if len(runs) > 1 else 0
    for ev in trace:
        name = ev.get("name", "")
        if ev.get("cat") == "Node" and name.endswith("_kernel_time") and ev["ts"] >= after_first:
            layer = layer_of.get(name[: -len("_kernel_time")])
            if layer is not None:
                attn_us[kinds[layer]] += ev["dur"]
    n_kind = {k: sum(1 for v in kind_of.values() if v == k) or 1 for k in attn_us}
    return {"context": context, "kv_bytes": kv, "peak_rss_bytes": peak_rss,
            "decode_ms_per_token": 1e3 * sorted(step_s)[len(step_s) // 2],
            "attn_ms_per_token_per_layer": {k: attn_us[k] / 1e3 / steps / n_kind[k] for k in attn_us}}


def _attention_node_layers(onnx_path: str) -> dict[str, int]:
    """Node name -> layer index for nodes inside a layer's self_attn scope (from the exporter's
    name_scopes metadata)."""
    import onnx

    m = onnx.load(onnx_path, load_external_data=False)
    out = {}
    for n in m.graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        for part in scopes.split("'"):
            if part.startswith("inner.model.layers.") and part.endswith(".self_attn"):
                out[n.name] = int(part.split(".")[3])
    return out


def small_benchmark(tmp: Path, decode: int) -> list[dict]:
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.models.demo import write_demo_checkpoint

    ckpt = write_demo_checkpoint(tmp / "ckpt", preset=small_config())
    rows = []
    for mode in ("ring", "full"):
        path = tmp / mode / "model.onnx"
        export_onnx(ckpt, path, ExportConfig(chunked_cache=mode))
        for mult in (1, 4, 16):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), str(mult * CHUNK), str(decode)],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row.update(mode=mode, multiple=mult)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def real_configs(tmp: Path) -> list[dict]:
    """KV bytes per sequence of the real configs at 128 K and 1 M tokens from the export's inputs."""
    import onnx

    from moec.common.kv_cache import kv_bytes_from_io
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.models import Llama4Config
    from moec.models.demo import write_demo_checkpoint

    rows = []
    for name in ("Llama-4-Scout-17B-16E-Instruct", "Llama-4-Maverick-17B-128E-Instruct"):
        src = tmp / name
        src.mkdir()
        shutil.copy(CONFIGS / f"{name}.config.json", src / "config.json")
        real = Llama4Config.from_pretrained(src)
        # Only what the KV cache does not depend on is shrunk.
        small = dataclasses.replace(real, hidden_size=64, intermediate_size=16, intermediate_size_mlp=16,
                                    num_local_experts=2, vocab_size=264, num_attention_heads=real.num_key_value_heads,
                                    eos_token_ids=(2,), bos_token_id=1, pad_token_id=None)
        ckpt = write_demo_checkpoint(tmp / f"{name}-small", preset=small)
        path = tmp / f"{name}.onnx"
        t0 = time.perf_counter()
        export_onnx(ckpt, path, ExportConfig(dtype="bf16", max_seq=1 << 20))
        m = onnx.load(str(path), load_external_data=False)
        inputs = [{"name": i.name, "dtype": "bf16",
                   "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]} for i in m.graph.input]
        full = [dict(t, shape=[*t["shape"][:2], "past_len", t["shape"][3]]) if t["name"].startswith("past_") else t
                for t in inputs]
        for context in (128 * 1024, 1 << 20):
            ring = kv_bytes_from_io(inputs, context)
            rows.append({"model": name, "layers": real.num_hidden_layers, "context": context, "ring_bytes": ring,
                         "ring_total": sum(ring.values()), "full_cache_total": sum(kv_bytes_from_io(full, context).values()),
                         "export_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def write_results(small: list[dict], real: list[dict]) -> None:
    mib = 1 << 20
    lines = [
        "# Long context: ring KV caches on chunked layers (benchmarks/long_context_kv.py)",
        "",
        "Machine: shared 2-core CPU, 6 other engineers running tests at the same time: timings are noisy "
        "(one run, median of the decode steps); bytes are exact.",
        "",
        f"## Small config (4 layers: 3 chunked, 1 NoPE; chunk {CHUNK}; 2 kv heads x 64; fp32; ORT CPU, 1 thread, "
        "graph optimizations off)",
        "",
        "| cache | context | KV chunked layers | KV NoPE layer | peak RSS | decode ms/token | self_attn ms/token/layer chunked | NoPE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in small:
        a = r["attn_ms_per_token_per_layer"]
        lines.append(f"| {r['mode']} | {r['multiple']}x ({r['context']}) | {r['kv_bytes']['chunked'] / 1024:.0f} KiB | "
                     f"{r['kv_bytes']['full'] / 1024:.0f} KiB | {r['peak_rss_bytes'] / mib:.0f} MiB | "
                     f"{r['decode_ms_per_token']:.2f} | {a['chunked']:.3f} | {a['full']:.3f} |")
    lines += ["", "## Real configs: KV bytes per sequence (bf16) from the export's input shapes", "",
              "| model | context | chunked layers (ring) | NoPE layers | total | full cache on every layer | ratio |",
              "|---|---|---|---|---|---|---|"]
    gib = 1 << 30
    for r in real:
        lines.append(f"| {r['model']} | {r['context']} | {r['ring_bytes']['chunked'] / gib:.2f} GiB | "
                     f"{r['ring_bytes']['full'] / gib:.2f} GiB | {r['ring_total'] / gib:.2f} GiB | "
                     f"{r['full_cache_total'] / gib:.2f} GiB | {r['ring_total'] / r['full_cache_total']:.3f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_context_kv.json").write_text(json.dumps({"small": small, "real": real}, indent=2) + "\n")
    (RESULTS / "long_context_kv.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, metavar=("ONNX", "CONTEXT", "DECODE"), help=argparse.SUPPRESS)
    ap.add_argument("--decode", type=int, default=16, help="decode steps timed per context")
    ap.add_argument("--skip-real", action="store_true", help="skip exporting the real configs")
    ap.add_argument("--only-real", action="store_true", help="only the real configs' KV bytes")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_context(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    with tempfile.TemporaryDirectory(prefix="moec-lc-") as tmp:
        small = [] if args.only_real else small_benchmark(Path(tmp), args.decode)
        real = [] if args.skip_real else real_configs(Path(tmp))
    write_results(small, real)


if __name__ == "__main__":
    main()
