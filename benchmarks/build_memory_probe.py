"""Benchmark: where `moec build`'s host memory goes, by phase, anonymous (the process's own copies)
and file-backed (pages of the memory-mapped weights) apart, and which builder option or lowering
changes it.

Runs one TensorRT-RTX sm89 build of an optimized ONNX (with external data) in this process,
sampling /proc/self/status every 0.1 s, and prints one JSON line: VmHWM, the engine's bytes, the
peak RssAnon / RssFile per phase (parse, build = build_serialized_network_to_stream, after), and
the anonymous RSS's turning points during the build (rises and falls of 100 MB or more).

    python benchmarks/build_memory_probe.py MODEL.onnx [--flag REFIT ...] [--opt-level N] [--no-pager] [--shapes SPEC]

--no-pager keeps the mapped weights' pages resident (the build before build_stream's pager).
Results of the runs made for issue 13: benchmarks/results/build_memory_probe.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _turning_points(samples: list[dict], step: int = 100 << 20) -> list[tuple[float, float]]:
    """(seconds into the build, anonymous GB) where the anonymous RSS turns by ``step`` or more."""
    build = [s for s in samples if s["phase"] == "build"]
    if not build:
        return []
    t0, points, direction = build[0]["t"], [build[0]], 0
    for s in build[1:]:
        d = s["RssAnon"] - points[-1]["RssAnon"]
        if abs(d) < step:
            continue
        if (d > 0) == (direction > 0) and direction:
            points[-1] = s  # the same rise or fall, further
        else:
            points.append(s)
            direction = 1 if d > 0 else -1
    return [(round(p["t"] - t0, 1), round(p["RssAnon"] / 1e9, 2)) for p in points]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--flag", action="append", default=[], help="a trt.BuilderFlag name to set")
    ap.add_argument("--opt-level", type=int, default=3)
    ap.add_argument("--no-pager", action="store_true")
    ap.add_argument("--shapes", action="append", default=[], help="as moec build --shapes (one custom profile)")
    args = ap.parse_args()

    import moec.compiler.build as build
    from moec.compiler.build import stream as build_stream

    if args.no_pager:
        build_stream.PAGE_RELEASE_S = 1e9
    samples: list[dict] = []
    phase = ["start"]

    def sample() -> None:
        while True:
            samples.append({**_status(), "t": time.perf_counter(), "phase": phase[0]})
            time.sleep(0.1)

    def in_phase(name: str, fn):
        def run(*a, **k):
            phase[0] = name
            try:
                return fn(*a, **k)
            finally:
                phase[0] = "after"
        return run

    real_config = build.builder_config

    def config_with_flags(flavour, *a, **k):
        cfg = real_config(flavour, *a, **k)
        for name in args.flag:
            cfg.set_flag(getattr(flavour.trt.BuilderFlag, name))
        return cfg

    build.network_from_onnx = in_phase("parse", build.network_from_onnx)
    build.build_serialized = in_phase("build", build.build_serialized)
    build.builder_config = config_with_flags
    threading.Thread(target=sample, daemon=True).start()
    weights = args.onnx.with_name(args.onnx.name + ".data").stat().st_size
    row: dict = {"onnx": str(args.onnx), "weight_bytes": weights, "flags": args.flag, "opt_level": args.opt_level,
                 "pager": not args.no_pager, "shapes": args.shapes}
    with tempfile.TemporaryDirectory(prefix="moec-build-probe-") as tmp:
        try:
            result = build.build_engine(args.onnx, Path(tmp) / "engine", build.BuildConfig(
                archs=("sm89",), backend="tensorrt-rtx", progress=False, opt_level=args.opt_level, shapes=tuple(args.shapes)))
            row["engine_bytes"] = sum(e["bytes"] for e in result.manifest["engines"])
        except Exception as e:  # the row records a refused option instead of stopping the sweep
            row["error"] = str(e).splitlines()[0][:200] + " " + " ".join(str(e).split())[-160:]
    time.sleep(0.3)
    row["peak_rss_bytes"] = _status()["VmHWM"]
    row["peaks"] = {}
    for s in samples:
        p = row["peaks"].setdefault(s["phase"], {"RssAnon": 0, "RssFile": 0})
        p["RssAnon"], p["RssFile"] = max(p["RssAnon"], s["RssAnon"]), max(p["RssFile"], s["RssFile"])
    row["anon_turning_points_s_gb"] = _turning_points(samples)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
