"""Compile moec's MoE kernels ahead of time for every target arch and record what they need.

No GPU needed (runtime/kernels/aot.py): for Llama 4's expert shapes (H=5120, I=8192), E in
{16, 128}, T in {1, 3, 16, 128, 1024, 4096}, k in {1, 2}, bf16 and fp16, every distinct kernel the
launch table picks (int32 and int64 expert ids) is compiled for sm80 (A100), sm86 (A10), sm87
(Jetson Orin), sm89 (L4) and sm90 (H100) and its shared memory, registers, local memory and asynchronous copies are written to
a JSON file and a markdown table.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources.json

Exit status 1 if any kernel does not fit its target.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning

import torch  # noqa: E402

from moec.common.artifacts import write_json_atomic  # noqa: E402
from moec.runtime.kernels import aot  # noqa: E402

POINTS = [(E, T, k) for E in (16, 128) for T in (1, 3, 16, 128, 1024, 4096) for k in (1, 2)]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| arch | dtype | ids | kernel | first point (E, T, k) | warps | stages | shared KiB | regs | local B | async copies | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tiles = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith(("BLOCK", "SPLIT", "USE_DOT")))
        lines.append(
            f"| {r['arch']} | {r['dtype']} | {r['ids_dtype']} | {r['kernel']} ({tiles}) | ({r['E']}, {r['T']}, {r['k']}) | {r['num_warps']} | "
            f"{r['num_stages']} | {r['shared_bytes'] / 1024:.1f} | {r['registers']} | {r['local_bytes']} | "
            f"{r['async_copies']} | {'yes' if not r['problems'] else '; '.join(r['problems'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON path; the markdown table goes beside it (.md)")
    ap.add_argument("--archs", default="sm80,sm86,sm87,sm89,sm90")
    args = ap.parse_args(argv)
    import triton

    start = time.perf_counter()
    rows = aot.survey(args.archs.split(","), POINTS, (torch.bfloat16, torch.float16))
    elapsed = time.perf_counter() - start
    misfits = [r for r in rows if r["problems"]]
    result = {
        "what": "moec MoE Triton kernels compiled ahead of time (no GPU) for each arch; one row per distinct kernel",
        "triton": triton.__version__,
        "shapes": {"H": 5120, "I": 8192, "points_E_T_k": POINTS},
        "limits_shared_bytes": {f"sm{a}": b for a, b in aot.MAX_SHARED_BYTES.items()},
        "compile_seconds": round(elapsed, 1),
        "kernels": len(rows),
        "misfits": len(misfits),
        "rows": rows,
    }
    write_json_atomic(args.out, result)
    args.out.with_suffix(".md").write_text(
        f"# MoE kernels compiled ahead of time (Triton {triton.__version__}, no GPU)\n\n"
        f"{len(rows)} distinct kernels over {args.archs}, bf16 and fp16, H=5120, I=8192; "
        f"{len(misfits)} do not fit. Compiled in {elapsed:.0f} s.\n\n" + markdown(rows)
    )
    print(f"{len(rows)} kernels, {len(misfits)} misfits -> {args.out}")
    for r in misfits:
        print("  " + "; ".join(r["problems"]), file=sys.stderr)
    return 1 if misfits else 0


if __name__ == "__main__":
    sys.exit(main())
