"""How often the paired gate gets it right on a shared, loaded CPU: `moec bench NEW --against OLD`
then `moec gate`, exactly as a CI job runs them (two processes), on the demo model.

Two cases, run alternately so that both meet the same load:
- self: NEW = OLD (the same .onnx). The right verdict is pass (exit 0).
- slow: NEW = the demo export with extra real work on every step (below), calibrated so that a
  decode step takes 1.3x as long; OLD = the export. The right verdict is regression (exit 1).

Targets (issue 12): self passes in >= 19 of 20, slow fails in >= 19 of 20, each comparison (bench
+ gate, process start included) within 60 s. The gate runs at the default --max-regression 5%,
and also at 10% on the same result (a second reading, not a second bench: the bench stopped early
for 5%, so the 10% verdict is never bolder than a bench asked for 10% would give).

The slower variant: the logits feed a chain of K x K MatMul + Tanh nodes (a [tokens, K] activation,
so the extra work grows with the tokens of a step like the model's own), whose sum, times 0, is
added to the logits: the outputs are unchanged, and ONNX Runtime cannot fold the chain away since
it depends on the input. Its length is calibrated on this host with a paired measurement of the
decode step (the calibrated slowdown is recorded); prefill gets slower by a different factor.

    python benchmarks/gate_reliability.py [--runs 20] [--threads 1] [--work DIR] [--no-neighbour]

Besides whatever else runs on the host, the script starts its own CPU-heavy neighbour for the whole
measurement (calibration included): one Python process spinning in a busy loop, a full core of a
2-core host.

Writes benchmarks/results/gate_reliability.json and .md. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGET_SLOWDOWN = 1.30
THRESHOLDS = ("5%", "10%")
# Written before measuring (see the .md): the figures this run is expected to give.
EXPECTED = ("run 4, a host with no other CPU-heavy job but this script's busy-loop neighbour (other engineers' jobs "
            "at nice 19): a round takes 0.1-0.2 s, so 35 s give 175-350 rounds and a self-comparison's 98.3% interval "
            "is about +-2%; self at 5%: >= 17/20 pass, the rest undecided (a per-process offset of 2-4% seen under "
            "load would push some intervals past 5%), 0 regressions; at 10%: 20/20. slow: 20/20 regression at the "
            "first look (30 rounds). Wall: slow 8-15 s, self 15-45 s (bench to --max-time or the 120-round look), "
            "all within 60 s")
K = 128  # width of the extra MatMul chain


def make_slow_variant(src: Path, dst: Path, links: int) -> None:
    """``src`` with ``links`` (MatMul [K,K] + Tanh) per step added to the logits times 0."""
    import shutil

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    logits = g.output[0].name  # contract.LOGITS
    rng = np.random.default_rng(0)
    # Rename the real logits, and make the graph output the sum.
    for node in g.node:
        node.output[:] = [f"{o}__real" if o == logits else o for o in node.output]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "slow_axes"),
             numpy_helper.from_array((rng.standard_normal((1, K)) * 0.1).astype(np.float32), "slow_w0"),
             numpy_helper.from_array(np.zeros((1,), np.float32), "slow_zero")]
    nodes = [helper.make_node("ReduceSum", [f"{logits}__real", "slow_axes"], ["slow_s"], keepdims=1),  # [B,S,1]
             helper.make_node("MatMul", ["slow_s", "slow_w0"], ["slow_h0"])]  # [B,S,K]
    for i in range(links):
        w = numpy_helper.from_array((rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32), f"slow_w{i + 1}")
        inits.append(w)
        nodes += [helper.make_node("MatMul", [f"slow_h{i}", w.name], [f"slow_m{i}"]),
                  helper.make_node("Tanh", [f"slow_m{i}"], [f"slow_h{i + 1}"])]
    nodes += [helper.make_node("ReduceSum", [f"slow_h{links}", "slow_axes"], ["slow_t"], keepdims=1),
              helper.make_node("Mul", ["slow_t", "slow_zero"], ["slow_z"]),
              helper.make_node("Add", [f"{logits}__real", "slow_z"], [logits])]
    g.initializer.extend(inits)
    g.node.extend(nodes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    from moec.common import contract

    shutil.copyfile(contract.sidecar_path(src), contract.sidecar_path(dst))
    shutil.copyfile(src.parent / contract.TOKENIZER_FILE, dst.parent / contract.TOKENIZER_FILE)


def paired_decode_slowdown(new: Path, old: Path, threads: int, seconds: float) -> float:
    """The decode step's slowdown of ``new`` against ``old`` (paired, ``seconds`` of rounds)."""
    from moec.compiler.gate_paired import slowdown_interval
    from moec.runtime.bench import BenchConfig
    from moec.runtime.bench_paired import PairedConfig, bench_paired

    r = bench_paired(new, old, PairedConfig(BenchConfig(threads=threads), max_time=seconds))
    return 1 + slowdown_interval(r["paired"]["ratios"]["decode_ms_per_step"], "lower").slowdown


def calibrate(base: Path, work: Path, threads: int) -> tuple[Path, int, float]:
    links, slowdown = 22, None
    for _ in range(4):
        variant = work / f"slow{links}" / "model.onnx"
        make_slow_variant(base, variant, links)
        slowdown = paired_decode_slowdown(variant, base, threads, 12.0)
        print(f"calibration: {links} links -> decode {slowdown:.3f}x", flush=True)
        if abs(slowdown - TARGET_SLOWDOWN) < 0.04:
            break
        links = max(1, round(links * (TARGET_SLOWDOWN - 1) / max(slowdown - 1, 0.01)))
    return variant, links, slowdown


def comparison(new: Path, old: Path, out: Path, threads: int) -> dict:
    moec = [sys.executable, "-m", "moec.compiler"]
    t0 = time.perf_counter()
    b = subprocess.run(moec + ["bench", str(new), "--against", str(old), "--json-out", str(out), "--threads", str(threads)],
                       capture_output=True, text=True)
    bench_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    g = subprocess.run(moec + ["gate", str(out), "--max-regression", THRESHOLDS[0]], capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="200"))
    gate_s = time.perf_counter() - t1
    row = {"bench_rc": b.returncode, "gate_rc": g.returncode, "wall_s": round(bench_s + gate_s, 1),
           "bench_s": round(bench_s, 1), "gate_s": round(gate_s, 1), "load_1min": os.getloadavg()[0],
           "gate_rc_at": {THRESHOLDS[0]: g.returncode}}
    if b.returncode == 0:
        # The other thresholds in this process (the same function the CLI calls; exit 0/1/2 as it gives them).
        from moec.compiler.gate import GateConfig, compare_paired, parse_percent

        for thr in THRESHOLDS[1:]:
            rep = compare_paired(json.loads(out.read_text()), GateConfig(max_regression=parse_percent(thr, "thr")))
            row["gate_rc_at"][thr] = 1 if rep.regressions else 2 if rep.undecided else 0
    if b.returncode == 0:
        r = json.loads(out.read_text())
        p = r["paired"]
        row |= {"rounds": p["rounds"], "timed_s": p["seconds"], "stop": p["stop"], "looked_at": p["looked_at"]}
        from moec.compiler.gate_paired import look_confidence, slowdown_interval

        for m in ("decode_ms_per_step", "prefill_ms"):
            iv = slowdown_interval(p["ratios"][m], "lower", look_confidence(p["looks"]))
            row[m] = {"slowdown": round(iv.slowdown, 4), "low": round(iv.low, 4), "high": round(iv.high, 4)}
    else:
        row["error"] = b.stderr[-400:]
    if g.returncode not in (0, 1):
        row["gate_error"] = g.stderr[-400:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-neighbour", action="store_true", help="Do not start the busy-loop neighbour.")
    ap.add_argument("--links", type=int, default=None,
                    help="Skip the calibration: the slow variant's chain length (from an earlier calibration).")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="moec_gate_rel_"))

    from moec.compiler.export import ExportConfig, export_onnx
    from moec.models.demo import write_demo_checkpoint

    base = work / "base" / "model.onnx"
    if not base.exists():
        write_demo_checkpoint(work / "ckpt", preset="llama4-tiny", seed=0)
        export_onnx(work / "ckpt", base, ExportConfig(dtype="fp32"))
    neighbour = None if args.no_neighbour else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        run(args, work, base, neighbour is not None)
    finally:
        if neighbour is not None:
            neighbour.kill()


def run(args, work: Path, base: Path, neighbour: bool) -> None:
    load_start = os.getloadavg()
    if args.links is None:
        slow, links, calibrated = calibrate(base, work, args.threads)
    else:
        links, slow = args.links, work / f"slow{args.links}" / "model.onnx"
        make_slow_variant(base, slow, links)
        calibrated = None  # set below from the slow comparisons themselves

    rows = {"self": [], "slow": []}
    t_start = time.time()

    def report(calibrated) -> None:
        """Write the results so far (after every pair of comparisons: a cut-short run still leaves them)."""
        if calibrated is None:
            measured = sorted(1 + r["decode_ms_per_step"]["slowdown"] for r in rows["slow"] if "decode_ms_per_step" in r)
            calibrated = measured[len(measured) // 2]

        def summary(case: str, want_rc: int, thr: str) -> dict:
            rs = rows[case]
            rc = [r["gate_rc_at"][thr] for r in rs]
            return {"runs": len(rs), "right": rc.count(want_rc), "undecided": rc.count(2),
                    "wrong": sum(c not in (want_rc, 2) for c in rc),
                    "max_wall_s": max(r["wall_s"] for r in rs), "median_wall_s": sorted(r["wall_s"] for r in rs)[len(rs) // 2],
                    "within_60s": sum(r["wall_s"] <= 60 for r in rs),
                    "median_bench_s": sorted(r["bench_s"] for r in rs)[len(rs) // 2],
                    "median_timed_s": sorted(r.get("timed_s", 0) for r in rs)[len(rs) // 2],
                    "median_rounds": sorted(r.get("rounds", 0) for r in rs)[len(rs) // 2]}

        result = {
            "neighbour": "a Python busy loop (one full core)" if neighbour else "none started",
            "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "load_1_5_15_at_start": load_start, "load_1_5_15_at_end": os.getloadavg()},
            "settings": {"threads": args.threads, "prompt_len": 32, "gen_len": 32, "max_time_s": 35,
                         "max_regression": list(THRESHOLDS), "first_look_rounds": 30, "looks": 3,
                         "per_look_confidence": "1 - 5%/3 = 98.3%",
                         "slow_variant": {"links": links, "K": K, "calibrated_decode_slowdown": round(calibrated, 3)}},
            "targets": {"self_pass": ">= 19/20", "slow_fail": ">= 19/20", "wall_s": "<= 60"},
            "expected": EXPECTED,
            "summary": {thr: {"self": summary("self", 0, thr), "slow": summary("slow", 1, thr)} for thr in THRESHOLDS},
            "runs_planned": args.runs,
            "minutes": round((time.time() - t_start) / 60, 1),
            "runs": rows,
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "gate_reliability.json").write_text(json.dumps(result, indent=2) + "\n")
        md = [
            "# Paired gate reliability (`moec bench NEW --against OLD` + `moec gate`, demo model, ONNX Runtime CPU)",
            "",
            f"Host: {result['host']['cpu']}, {result['host']['cores']} cores, SHARED and loaded: 1/5/15-minute load "
            f"average {tuple(round(x, 1) for x in load_start)} at the start, "
            f"{tuple(round(x, 1) for x in result['host']['load_1_5_15_at_end'])} at the end (other engineers' builds and "
            "test runs), plus " + ("this script's own neighbour: a Python busy loop on one core for the whole "
                                   "measurement" if neighbour else "no neighbour of this script's") +
            ". Timings on this host are noisy and vary run to run.",
            "",
            f"Settings: --threads {args.threads}, prompt 32, gen 32, --max-time 35, --rounds 30 (first early look; the "
            "next at 120; 3 looks in all, each at 98.3%), bench --max-regression 5% (the defaults, but --threads); the "
            "gate reads each result at 5% and at 10%. Slow variant: "
            f"{links} extra MatMul[{K}x{K}]+Tanh links per step, "
            + (f"calibrated to {calibrated:.2f}x per decode step (paired, on this host)." if args.links is None else
               f"--links {links} from an earlier calibration on this host; its decode step measured "
               f"{calibrated:.2f}x slower (median over the slow comparisons)."),
            "",
            f"Runs: {len(rows['self'])} of each case of the {args.runs} planned, alternately, in "
            f"{(time.time() - t_start) / 60:.0f} minutes.",
            "",
            f"Expected before measuring (written in the script before this run): {EXPECTED}.",
            "",
            "| case | --max-regression | right verdict | right | undecided (exit 2) | wrong | median rounds | "
            "median timed s | median bench s | median wall s | max wall s | within 60 s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for thr in THRESHOLDS:
            for case, name, want in (("self", "self (NEW = OLD)", "pass (0)"),
                                     ("slow", f"slow ({calibrated:.2f}x decode)", "regression (1)")):
                c = result["summary"][thr][case]
                md.append(f"| {name} | {thr} | {want} | {c['right']}/{c['runs']} | {c['undecided']} | {c['wrong']} | "
                          f"{c['median_rounds']} | {c['median_timed_s']} | {c['median_bench_s']} | {c['median_wall_s']} | "
                          f"{c['max_wall_s']} | {c['within_60s']}/{c['runs']} |")
        md += ["",
               "Wall time is bench + one gate (at 5%) as two CLI processes, process start and model load included; "
               "bench s is the bench process alone, timed s its timed rounds.", ""]
        (RESULTS / "gate_reliability.md").write_text("\n".join(md))
        print("\n".join(md))

    for i in range(args.runs):
        for case, new in (("self", base), ("slow", slow)):
            row = comparison(new, base, work / f"{case}{i}.json", args.threads)
            rows[case].append(row)
            print(case, i, row.get("gate_rc"), row.get("wall_s"), row.get("rounds"), row.get("decode_ms_per_step"),
                  flush=True)
        report(calibrated)


if __name__ == "__main__":
    main()
