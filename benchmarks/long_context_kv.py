"""KV memory and decode cost with ring caches on the chunked layers (issue 14).

Writes benchmarks/results/long_context_kv.{json,md}:

1. A small config (4 layers: 3 chunked with chunk C = 128, 1 NoPE; 2 kv heads x 64 dims, fp32),
   exported twice (chunked_cache ring and full). For contexts 1x, 4x, 16x C: prefill in chunks of
   C, then decode steps on ONNX Runtime CPU, each context in a fresh process: KV bytes held (the
   cache OrtValues' shapes), peak RSS, decode time per token, and ORT's profiler time of the
   self_attn nodes per layer kind (graph optimizations off so node names keep their layer).
2. The real Scout and Maverick configs (../shared/llama4-configs; layers, kv heads, head dim,
   chunk and NoPE pattern kept, hidden/vocab/experts shrunk): exported with max_seq 1 M (bf16)
   and built into a TensorRT-RTX sm89 engine for a 1 M context; KV bytes per sequence at 128 K
   and 1 M tokens from the engine's I/O shapes (the manifest's ``io``), next to the figure of
   full caches on every layer, and the engine memory plan's (compiler/plan.py) as a cross-check.

Expected before measuring: chunked layers' KV flat at 3 x C x 2 x 2 x 64 x 4 B = 384 KiB per
sequence at every context, NoPE's growing linearly (16x from 1x to 16x); peak RSS grows only by
the NoPE share plus the prefill's transient; chunked layers' attention time per decode token
flat (C + 1 keys at any context) while the NoPE layer's grows ~16x. Real configs: 36 of 48
layers chunked, so at 1 M tokens KV is 12/48 + 36 x 8192 / (48 x 1 M) of full, about 0.25x.

Timing (shared machine): every (cache, context) pair runs ``--rounds`` times, the rounds
interleaved (ring 1x, ring 4x, ..., full 16x, then again, the order rotated each round) so a burst
of load from other processes hits all pairs alike; each figure is the median over rounds of a
child's median over its steps, with the rounds' min..max beside it.

Usage: python benchmarks/long_context_kv.py [--rounds N] [--decode N] [--skip-real | --only-real]
(--only-real keeps the small config's rows of the last run, --skip-real its real rows.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
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
MULTIPLES = (1, 4, 16)
MODES = ("ring", "full")
REAL_MODELS = ("Llama-4-Scout-17B-16E-Instruct", "Llama-4-Maverick-17B-128E-Instruct")
REAL_CONTEXTS = (128 * 1024, 1 << 20)


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

    # Profile decode steps with the same cache: per step, the kernel time of the self_attn nodes
    # (the exporter's name scopes) per layer kind. Steps are told apart by the profiler's
    # model_run events (their ts..ts+dur span); the first (a new session's allocations) is dropped.
    layer_of = _attention_node_layers(onnx_path)
    prof_sess = session(True)
    prof = OrtBackend(prof_sess, Path(onnx_path), sidecar, graph_optimization=False)
    steps = decode
    for _ in range(steps + 1):
        token = logits[:, -1].argmax(-1)[:, None]
        logits, cache = prof.forward(token, np.array([[pos]]), cache)
        pos += 1
    trace = json.loads(Path(prof_sess.end_profiling()).read_text())
    runs = sorted((ev["ts"], ev["ts"] + ev["dur"]) for ev in trace if ev.get("name") == "model_run")
    if len(runs) != steps + 1:
        raise RuntimeError(f"the ORT profile has {len(runs)} model_run events, expected {steps + 1}")
    per_step = {"chunked": [0.0] * steps, "full": [0.0] * steps}
    n_kind = {k: sum(1 for v in kind_of.values() if v == k) for k in per_step}
    for ev in trace:
        name = ev.get("name", "")
        if ev.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        layer = layer_of.get(name[: -len("_kernel_time")])
        step = next((i for i, (a, b) in enumerate(runs) if a <= ev["ts"] <= b), None)
        if layer is not None and step:  # step 0: the dropped first run
            per_step[kind_of[layer]][step - 1] += ev["dur"] / 1e3 / n_kind[kind_of[layer]]
    step_ms = sorted(1e3 * t for t in step_s)
    return {"context": context, "kv_bytes": kv, "peak_rss_bytes": peak_rss,
            "decode_ms_per_token": statistics.median(step_ms),
            "attn_ms_per_token_per_layer": {k: statistics.median(v) for k, v in per_step.items()},
            "attention_nodes": len(layer_of)}


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


def small_benchmark(tmp: Path, decode: int, rounds: int) -> list[dict]:
    """Every (cache, context) pair ``rounds`` times, interleaved, each run in a fresh process;
    one row per pair: medians over the rounds and their min..max."""
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.models.demo import write_demo_checkpoint

    ckpt = write_demo_checkpoint(tmp / "ckpt", preset=small_config())
    paths = {}
    for mode in MODES:
        paths[mode] = tmp / mode / "model.onnx"
        export_onnx(ckpt, paths[mode], ExportConfig(chunked_cache=mode))
    pairs = [(mode, mult) for mode in MODES for mult in MULTIPLES]
    runs: dict[tuple[str, int], list[dict]] = {p: [] for p in pairs}
    for r in range(rounds):
        for mode, mult in pairs[r % len(pairs):] + pairs[: r % len(pairs)]:
            out = subprocess.run([sys.executable, __file__, "--child", str(paths[mode]), str(mult * CHUNK), str(decode)],
                                 check=True, capture_output=True, text=True).stdout
            runs[(mode, mult)].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{rounds} {mode} {mult}x: {runs[(mode, mult)][-1]['attn_ms_per_token_per_layer']}",
                  flush=True)
    rows = []
    for (mode, mult), rs in runs.items():
        def spread(get):
            v = [get(x) for x in rs]
            return {"median": statistics.median(v), "min": min(v), "max": max(v)}

        kv = rs[0]["kv_bytes"]
        assert all(x["kv_bytes"] == kv for x in rs), "KV bytes differ between runs of one pair"
        rows.append({"mode": mode, "multiple": mult, "context": mult * CHUNK, "rounds": len(rs), "kv_bytes": kv,
                     "peak_rss_bytes": spread(lambda x: x["peak_rss_bytes"]),
                     "decode_ms_per_token": spread(lambda x: x["decode_ms_per_token"]),
                     "attn_ms_per_token_per_layer": {k: spread(lambda x, k=k: x["attn_ms_per_token_per_layer"][k])
                                                     for k in ("chunked", "full")}})
    return rows


def real_configs(tmp: Path) -> list[dict]:
    """KV bytes per sequence of the real configs at 128 K and 1 M tokens from a built engine's
    I/O shapes (TensorRT-RTX sm89, context 1 M), the plan's figure beside them."""
    from moec.common.kv_cache import kv_bytes_from_io
    from moec.compiler.build import BuildConfig, build_engine
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.compiler.plan import Layout, kv_bytes
    from moec.models import Llama4Config
    from moec.models.demo import write_demo_checkpoint

    rows = []
    for name in REAL_MODELS:
        src = tmp / name
        src.mkdir()
        (src / "config.json").write_text((CONFIGS / f"{name}.config.json").read_text())
        real = Llama4Config.from_pretrained(src)
        # Only what the KV cache does not depend on is shrunk.
        small = dataclasses.replace(real, hidden_size=64, intermediate_size=16, intermediate_size_mlp=16,
                                    num_local_experts=2, vocab_size=264, num_attention_heads=real.num_key_value_heads,
                                    eos_token_ids=(2,), bos_token_id=1, pad_token_id=None)
        ckpt = write_demo_checkpoint(tmp / f"{name}-small", preset=small)
        path = tmp / name / "onnx" / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(ckpt, path, ExportConfig(dtype="bf16", max_seq=1 << 20))
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest = build_engine(path, tmp / name / "engine",
                                BuildConfig(archs=("sm89",), max_seq=1 << 20, max_batch=1, max_new_tokens=CHUNK,
                                            progress=False)).manifest
        build_s = time.perf_counter() - t0
        inputs = manifest["io"]["inputs"]
        full = [dict(t, shape=[*t["shape"][:2], -1, t["shape"][3]]) if t["name"].startswith("past_") else t
                for t in inputs]
        for context in REAL_CONTEXTS:
            ring = kv_bytes_from_io(inputs, context)
            plan_full, plan_chunked = kv_bytes(real, Layout(1, 1), context, 1, 2, ring=True)
            rows.append({"model": name, "source": "engine", "layers": real.num_hidden_layers,
                         "chunked_layers": sum(map(real.uses_chunked_attention, range(real.num_hidden_layers))),
                         "kv_heads": real.num_key_value_heads, "head_dim": real.head_dim,
                         "chunk": real.attention_chunk_size, "context": context, "ring_bytes": ring,
                         "ring_total": sum(ring.values()),
                         "full_cache_total": sum(kv_bytes_from_io(full, context).values()),
                         "plan_bytes": {"chunked": plan_chunked, "full": plan_full},
                         "engine_kv_cache": manifest["kv_cache"],
                         "export_s": round(export_s, 1), "build_s": round(build_s, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def real_from_layout(tmp: Path) -> list[dict]:
    """The same rows without an export or an engine (``--real-source layout``): the per-layer
    caches the export would write (``kv_cache_entries`` of the model at a 1 M context, the real
    config unshrunk, on the meta device) turned into past-input shapes, then the same byte count."""
    import torch

    from moec.common.kv_cache import kv_bytes_from_io
    from moec.compiler.export import kv_cache_entries
    from moec.compiler.plan import Layout, kv_bytes
    from moec.models import Llama4Config
    from moec.models.llama4 import Llama4ForCausalLM, default_ring_slots

    rows = []
    for name in REAL_MODELS:
        src = tmp / name
        src.mkdir()
        (src / "config.json").write_text((CONFIGS / f"{name}.config.json").read_text())
        real = Llama4Config.from_pretrained(src)
        with torch.device("meta"):
            model = Llama4ForCausalLM(real, ring_slots=default_ring_slots(real, 1 << 20))
        entries = kv_cache_entries(model, 1 << 20)
        inputs = [{"name": f"past_{kv}.{e['layer']}", "dtype": "bf16",
                   "shape": [-1, real.num_key_value_heads, e["slots"] if e["kind"] == "chunked" else -1, real.head_dim]}
                  for e in entries for kv in ("key", "value")]
        full = [dict(t, shape=[*t["shape"][:2], -1, t["shape"][3]]) for t in inputs]
        for context in REAL_CONTEXTS:
            ring = kv_bytes_from_io(inputs, context)
            plan_full, plan_chunked = kv_bytes(real, Layout(1, 1), context, 1, 2, ring=True)
            rows.append({"model": name, "source": "layout", "layers": real.num_hidden_layers,
                         "chunked_layers": sum(map(real.uses_chunked_attention, range(real.num_hidden_layers))),
                         "kv_heads": real.num_key_value_heads, "head_dim": real.head_dim,
                         "chunk": real.attention_chunk_size, "context": context, "ring_bytes": ring,
                         "ring_total": sum(ring.values()),
                         "full_cache_total": sum(kv_bytes_from_io(full, context).values()),
                         "plan_bytes": {"chunked": plan_chunked, "full": plan_full}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _ms(s: dict) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}..{s['max']:.3f})"


def write_results(small: list[dict], real: list[dict], rounds: int) -> None:
    mib, gib = 1 << 20, 1 << 30
    lines = [
        "# Long context: ring KV caches on chunked layers (benchmarks/long_context_kv.py)",
        "",
        "Machine: a shared 2-core CPU, other engineers running tests on it at the same time: timings are noisy. "
        f"Each timing is the median of {rounds} interleaved rounds (each a fresh process; per round the median of its "
        "steps), with the rounds' min..max in brackets; bytes are exact.",
        "",
        f"## Small config (4 layers: 3 chunked, 1 NoPE; chunk {CHUNK}; 2 kv heads x 64; fp32; ORT CPU, 1 thread, "
        "graph optimizations off)",
        "",
        "Expected: ring rows' chunked KV flat at 384 KiB and chunked self_attn time flat from 1x to 16x; full rows' "
        "chunked KV 16x from 1x to 16x and their chunked self_attn time growing with the context (as the NoPE "
        "layer's does in both).",
        "",
        "| cache | context | KV chunked layers | KV NoPE layer | peak RSS MiB | decode ms/token | self_attn ms/token/layer: chunked | NoPE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in small:
        a = r["attn_ms_per_token_per_layer"]
        lines.append(f"| {r['mode']} | {r['multiple']}x ({r['context']}) | {r['kv_bytes']['chunked'] / 1024:.0f} KiB | "
                     f"{r['kv_bytes']['full'] / 1024:.0f} KiB | {r['peak_rss_bytes']['median'] / mib:.0f} | "
                     f"{_ms(r['decode_ms_per_token'])} | {_ms(a['chunked'])} | {_ms(a['full'])} |")
    lines += ["", "## Real configs: KV bytes per sequence (bf16)", "",
              "With `--real-source engine` (the default): a TensorRT-RTX sm89 engine of each config (48 layers, 8 kv heads x 128, chunk 8192 kept; hidden size, "
              "experts and vocab shrunk, which the KV cache does not depend on) built for a 1 M-token context. "
              "Expected: 36 of 48 layers chunked, so ring total / full = 12/48 + 36 x 8192 / (48 x context): "
              "0.297 at 128 K, 0.256 at 1 M; the plan column is compiler/plan.py's figure for the same engine.", "",
              "Source `engine`: that engine's I/O shapes; `layout`: the per-layer caches the export writes for the "
              "unshrunk config at a 1 M context (no export or build: `--real-source layout`).", "",
              "| model | source | context | chunked layers (ring) | NoPE layers | total | full cache on every layer | ratio | plan |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in real:
        plan = sum(r["plan_bytes"].values())
        lines.append(f"| {r['model']} | {r.get('source', 'engine')} | {r['context']} | {r['ring_bytes']['chunked'] / gib:.3f} GiB | "
                     f"{r['ring_bytes']['full'] / gib:.3f} GiB | {r['ring_total'] / gib:.3f} GiB | "
                     f"{r['full_cache_total'] / gib:.3f} GiB | {r['ring_total'] / r['full_cache_total']:.3f} | "
                     f"{'equal' if plan == r['ring_total'] else f'{plan / gib:.3f} GiB'} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_context_kv.json").write_text(json.dumps({"rounds": rounds, "small": small, "real": real},
                                                             indent=2) + "\n")
    (RESULTS / "long_context_kv.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, metavar=("ONNX", "CONTEXT", "DECODE"), help=argparse.SUPPRESS)
    ap.add_argument("--decode", type=int, default=16, help="decode steps timed (and profiled) per run")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved runs of every (cache, context) pair")
    ap.add_argument("--skip-real", action="store_true", help="skip the real configs (keep the last run's rows)")
    ap.add_argument("--only-real", action="store_true", help="only the real configs (keep the last small rows)")
    ap.add_argument("--real-source", choices=("engine", "layout"), default="engine",
                    help="real rows from a built engine's I/O shapes, or from the export's cache layout alone")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_context(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    last_path = RESULTS / "long_context_kv.json"
    last = json.loads(last_path.read_text()) if last_path.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="moec-lc-") as tmp:
        small = last.get("small", []) if args.only_real else small_benchmark(Path(tmp), args.decode, args.rounds)
        real_rows = real_configs if args.real_source == "engine" else real_from_layout
        real = last.get("real", []) if args.skip_real else real_rows(Path(tmp))
    write_results(small, real, last.get("rounds", args.rounds) if args.only_real else args.rounds)


if __name__ == "__main__":
    main()
