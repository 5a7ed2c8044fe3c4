"""Time moec's Triton MoE kernel against torch's grouped_mm and the dense Llama 4 formulation.

Needs a CUDA GPU (an H100 for the numbers the issue asks for). One run measures, on the same card:
  - copy bandwidth (device-to-device copy of 2 GiB, bytes read + written) and a bf16 8192^3
    matmul rate: the two roofs of the floor;
  - for H=5120, I=8192 (Llama 4 experts), E in {16, 128}, top-1 random routing, T in
    {1, 16, 128, 1024, 4096}: the kernel (``grouped_experts_triton``), torch._grouped_mm on tokens
    sorted by expert (the sort is inside the timed region, as it is inside the kernel's), and the
    dense bmm over all experts (skipped where its [E, T, 2I] intermediate exceeds --dense-max-gib);
    for T <= 64 the kernel and grouped_mm are captured in CUDA graphs, so launch overhead is not
    what is compared.
  floor = max(bytes of the distinct experts touched / bandwidth, FLOPs / matmul rate).
Correctness comes first: every (E, T) point is compared against the fp32 reference
(runtime/kernels/reference.py) and the run stops if the kernel's error exceeds 1e-2.

Writes a JSON (device, bandwidth, matmul rate, one row per (E, T)) and a markdown table beside it.

    python benchmarks/kernel_bench.py --out benchmarks/kernel_results_h100.json

With --tune, after timing the shipped launch parameters at a point, the run searches them
(coordinate descent from the defaults, and from the other path's defaults where both paths are
plausible: 8 <= T <= 128), within --tune-budget-s seconds over all points. Every candidate is
checked against the reference before it is timed. The best per point go into the row
(``tuned_ms``, ``tuned_frac_of_floor``, ``tuned_config``, every trial) and into a tuned-configs file
(``<out stem>_tuned_configs.json``) in moe_configs.json's format: run moec with
MOEC_MOE_CONFIGS=<that file> to use them, or merge them into runtime/kernels/moe_configs.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

H_LLAMA4, I_LLAMA4 = 5120, 8192
E_VALUES = (16, 128)
T_VALUES = (1, 16, 128, 1024, 4096)
GRAPH_MAX_T = 64
ERR_LIMIT = 1e-2
# Where the inputs live. Only the tests change it (to "cpu", with Triton's interpreter and a
# stand-in timer) to run main() end to end without a GPU; timings from that are not results.
DEVICE = "cuda"


def expert_bytes(H: int, I: int, elem_bytes: int = 2) -> int:
    """Weight bytes of one SwiGLU expert: gate/up [H, 2I] and down [I, H]."""
    return 3 * H * I * elem_bytes


def floor_ms(distinct_experts: int, tokens_x_k: int, H: int, I: int, bandwidth_Bps: float, flops_per_s: float):
    """(floor, bytes floor, FLOPs floor) in ms, as the issue defines it: the weights of each
    touched expert read once (hidden states are < 0.3% of that and left out), and 6*H*I FLOPs per
    token-expert pair (three H x I matmuls)."""
    nbytes = distinct_experts * expert_bytes(H, I)
    flops = 6.0 * tokens_x_k * H * I
    bytes_ms = nbytes / bandwidth_Bps * 1e3
    flops_ms = flops / flops_per_s * 1e3
    return max(bytes_ms, flops_ms), bytes_ms, flops_ms


def expected_distinct(T: int, E: int, K: int = 1) -> float:
    """Expected number of experts touched by T tokens routed uniformly at random (top-K)."""
    return E * (1.0 - (1.0 - K / E) ** T)


# --- measurement ------------------------------------------------------------------------------


def _require_gpu():
    try:
        import torch
    except ImportError:
        sys.exit("kernel_bench.py: torch is not installed")
    if not torch.cuda.is_available():
        sys.exit(
            "kernel_bench.py needs a CUDA GPU and torch.cuda.is_available() is False on this machine; "
            "run it on an H100 (see benchmarks/KERNEL_NOTES.md)"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("kernel_bench.py needs Triton (pip install triton)")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_bench.py: unset TRITON_INTERPRET; the interpreter cannot be timed")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def time_ms(fn, iters: int, graph: bool) -> float:
    """Median ms per call over ``iters`` calls (graph: one replay of a captured call per sample)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm the caching allocator on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
        run()
    else:
        run = fn
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def measure_bandwidth_Bps(gib: float = 2.0, iters: int = 20) -> float:
    import torch

    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters, graph=False)
    return 2 * n / (ms * 1e-3)


def measure_matmul_flops(n: int = 8192, iters: int = 20) -> float:
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(lambda: torch.mm(a, b), iters, graph=False)
    return 2.0 * n**3 / (ms * 1e-3)


def max_row_rel_err(out, ref) -> float:
    """The largest per-token relative error ||out_t - ref_t|| / ||ref_t||."""
    num = (out.float() - ref.float()).norm(dim=-1)
    den = ref.float().norm(dim=-1).clamp_min(1e-30)
    return float((num / den).max())


def grouped_mm_moe(x_TH, ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH):
    """The same op with torch._grouped_mm on tokens sorted by expert (score on the input)."""
    import torch
    import torch.nn.functional as F

    T, H = x_TH.shape
    K = ids_TK.shape[1]
    E, _, I2 = w_gate_up_EHI2.shape
    ids_P = ids_TK.reshape(-1)
    order = torch.argsort(ids_P)
    counts = torch.zeros(E, dtype=torch.int32, device=x_TH.device).index_add_(0, ids_P, torch.ones_like(ids_P, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    s_P = scores_TK.reshape(-1).to(x_TH.dtype)[order]
    xs = x_TH[order // K] * s_P[:, None]
    gu = torch._grouped_mm(xs, w_gate_up_EHI2, offs=offs)
    a = F.silu(gu[:, : I2 // 2]) * gu[:, I2 // 2 :]
    y = torch._grouped_mm(a, w_down_EIH, offs=offs)
    out = torch.zeros(T * K, H, dtype=torch.float32, device=x_TH.device)
    out[order] = y.float()
    return out.view(T, K, H).sum(1).to(x_TH.dtype)


def dense_moe(x_TH, ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH):
    """transformers' Llama 4 formulation in bf16: every token through every expert."""
    import torch
    import torch.nn.functional as F

    T, H = x_TH.shape
    E, _, I2 = w_gate_up_EHI2.shape
    scores_TE = torch.zeros(T, E, dtype=x_TH.dtype, device=x_TH.device).scatter_(1, ids_TK, scores_TK.to(x_TH.dtype))
    routed = x_TH.unsqueeze(0) * scores_TE.t().unsqueeze(-1)  # [E, T, H]
    gu = torch.bmm(routed, w_gate_up_EHI2)
    return torch.bmm(F.silu(gu[..., : I2 // 2]) * gu[..., I2 // 2 :], w_down_EIH).sum(0)


def bench_point(E, T, weights, bandwidth, flops, args, tune_seconds: float = 0.0) -> dict:
    import torch

    from moec.runtime.kernels.moe_triton import grouped_experts_triton, select_config
    from moec.runtime.kernels.reference import grouped_experts_reference

    w1, w2 = weights
    H, I = w1.shape[1], w2.shape[1]
    gen = torch.Generator(device=DEVICE).manual_seed(1000 * E + T)
    x = torch.randn(T, H, generator=gen, device=DEVICE).to(torch.bfloat16)
    ids = torch.randint(0, E, (T, 1), generator=gen, device=DEVICE)
    scores = torch.sigmoid(torch.randn(T, 1, generator=gen, device=DEVICE))
    distinct = int(torch.unique(ids).numel())
    floor, bytes_floor, flops_floor = floor_ms(distinct, T, H, I, bandwidth, flops)
    row = {"E": E, "T": T, "distinct_experts": distinct, "floor_ms": floor,
           "floor_bytes_ms": bytes_floor, "floor_flops_ms": flops_floor}

    ref = grouped_experts_reference(x, ids, scores, w1, w2, True)  # fp32 inside, per expert present
    kernel = lambda: grouped_experts_triton(x, ids, scores, w1, w2, True)  # noqa: E731
    row["max_rel_err"] = max_row_rel_err(kernel(), ref)
    cfg = select_config(E, H, I, T, 1, device_name())
    row["kernel_path"], row["kernel_config_tuned"] = cfg.path, cfg.tuned
    if row["max_rel_err"] > ERR_LIMIT:
        raise SystemExit(f"E={E} T={T}: kernel max relative error {row['max_rel_err']:.3e} > {ERR_LIMIT}; not timing")

    graph = T <= GRAPH_MAX_T
    row["cuda_graph"] = graph
    row["kernel_ms"] = time_ms(kernel, args.iters, graph)
    row["kernel_frac_of_floor"] = floor / row["kernel_ms"]

    gmm = lambda: grouped_mm_moe(x, ids, scores, w1, w2)  # noqa: E731
    try:
        row["grouped_mm_max_rel_err"] = max_row_rel_err(gmm(), ref)
        row["grouped_mm_ms"] = time_ms(gmm, args.iters, graph)
        row["grouped_mm_frac_of_floor"] = floor / row["grouped_mm_ms"]
    except RuntimeError as e:  # a torch build without _grouped_mm for this layout/arch
        row["grouped_mm_ms"] = None
        row["grouped_mm_error"] = str(e).splitlines()[0]

    dense_gib = E * T * (w1.shape[2] + H) * 2 / (1 << 30)
    if dense_gib <= args.dense_max_gib:
        dense = lambda: dense_moe(x, ids, scores, w1, w2)  # noqa: E731
        row["dense_max_rel_err"] = max_row_rel_err(dense(), ref)
        row["dense_ms"] = time_ms(dense, max(3, args.iters // 4), graph=False)
        row["dense_frac_of_floor"] = floor / row["dense_ms"]
    else:
        row["dense_ms"] = None
        row["dense_skipped"] = f"[E, T, 2I + H] intermediates {dense_gib:.1f} GiB > --dense-max-gib {args.dense_max_gib}"
    row["kernel_faster_than_grouped_mm"] = row["grouped_mm_ms"] is not None and row["kernel_ms"] < row["grouped_mm_ms"]
    if args.tune:
        tune_point(row, x, ids, scores, w1, w2, ref, args, time.perf_counter() + tune_seconds)
    return row


# --- tuning -----------------------------------------------------------------------------------

# The launch parameters each path searches, in the order they are varied. Decode's row tile
# follows T (block_m), so it is not searched.
DECODE_SPACE = {
    "split_k_gate_up": (1, 2, 4, 8),
    "split_k_down": (1, 2, 4, 8),
    "block_n_gate_up": (32, 64, 128),
    "block_n_down": (32, 64, 128),
    "block_k": (64, 128, 256),
    "num_stages": (2, 3, 4),
    "num_warps": (2, 4, 8),
}
PREFILL_SPACE = {
    "block_m": (16, 32, 64, 128),
    "block_n_gate_up": (64, 128, 256),
    "block_n_down": (64, 128, 256),
    "block_k": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4, 5),
}
SPACES = {"decode": DECODE_SPACE, "prefill": PREFILL_SPACE}
# Extra starts where the prefill GEMMs are compute-bound (>= 128 rows per expert): 128-row tiles
# over two warpgroups, which single-parameter steps from 64x64 with 4 warps do not reach (a
# 128-row tile with 4 warps is slower than either). Compiled ahead of time for sm90 they fit
# without spills (238 registers for 128x128 gate/up, 97-145 KiB of shared memory); on sm80 the
# 128x128 gate/up spills, so they are starts of the H100 search, not defaults.
COMPUTE_BOUND_STARTS = (
    {"block_m": 128, "block_n_gate_up": 64, "block_n_down": 128, "block_k": 64, "num_warps": 8, "num_stages": 3},
    {"block_m": 128, "block_n_gate_up": 128, "block_n_down": 128, "block_k": 64, "num_warps": 8, "num_stages": 3},
)
# A candidate must beat the incumbent by this much to replace it: timing noise of ~1% must not
# walk the search away from the defaults.
MIN_GAIN = 0.02


def coordinate_descent(starts, cost, deadline: float, rounds: int = 2):
    """Minimise ``cost(config)`` (ms, or None for a candidate that failed) one parameter at a time,
    from the best of ``starts``: each parameter of the config's path is set to each of its values
    with the others held at the incumbent, a change kept when it gains MIN_GAIN; repeated while a
    round improves, at most ``rounds`` times, and never past ``deadline`` (time.perf_counter()).
    Returns (best config, its cost, [(config, cost), ...] in the order tried)."""
    from dataclasses import replace

    trials = []
    best, best_cost = None, None
    for start in starts:
        c = cost(start)
        trials.append((start, c))
        if c is not None and (best_cost is None or c < best_cost):
            best, best_cost = start, c
    if best is None:
        return None, None, trials
    for _ in range(rounds):
        improved = False
        for name, values in SPACES[best.path].items():
            for value in values:
                if time.perf_counter() > deadline:
                    return best, best_cost, trials
                if getattr(best, name) == value:
                    continue
                candidate = replace(best, **{name: value})
                c = cost(candidate)
                trials.append((candidate, c))
                if c is not None and c < best_cost * (1 - MIN_GAIN):
                    best, best_cost, improved = candidate, c, True
        if not improved:
            break
    return best, best_cost, trials


def config_entry(cfg) -> dict:
    """A tuned-table entry (moe_configs.json) for one config: its path and every tunable field."""
    fields = SPACES[cfg.path].keys() | {"block_m"}  # decode's block_m is the same for every T of a bucket
    return {"path": cfg.path, **{name: getattr(cfg, name) for name in sorted(fields)}}


def device_key(device_name: str) -> str:
    """The substring of the device name the tuned table is keyed by ("H100" for an
    "NVIDIA H100 80GB HBM3"), so the entries serve every variant of that card."""
    for key in ("H200", "H100", "A100", "L40S", "L4", "B200"):
        if key in device_name:
            return key
    return device_name


def tuned_configs(device_name: str, rows: list[dict], H: int, I: int) -> dict:
    from moec.runtime.kernels.moe_triton import config_key

    entries = {config_key(r["E"], H, I, r["T"]): r["tuned_config"] for r in rows if r.get("tuned_config")}
    return {
        "comment": f"Tuned on {device_name} by benchmarks/kernel_bench.py --tune; use with MOEC_MOE_CONFIGS=<this file>.",
        "tuned": {device_key(device_name): entries},
    }


def tune_point(row, x, ids, scores, w1, w2, ref, args, deadline: float) -> None:
    """Search the launch parameters at one point and record the result in ``row``."""
    from dataclasses import replace

    from moec.runtime.kernels.moe_triton import default_config, default_path, grouped_experts_triton

    T, E = row["T"], row["E"]
    graph = T <= GRAPH_MAX_T

    def cost(cfg):
        try:
            call = lambda: grouped_experts_triton(x, ids, scores, w1, w2, True, config=cfg)  # noqa: E731
            if max_row_rel_err(call(), ref) > ERR_LIMIT:
                return None
            return time_ms(call, max(5, args.iters // 2), graph)
        except Exception:  # out of resources, a launch failure: not a usable config
            return None

    started = time.perf_counter()
    path = default_path(T)
    starts = [default_config(path, E, T, 1)]
    if 8 <= T <= 128:
        starts.append(default_config("prefill" if path == "decode" else "decode", E, T, 1))
    if path == "prefill" and T // E >= 128:
        starts += [replace(starts[0], **fields) for fields in COMPUTE_BOUND_STARTS]
    best, best_ms, trials = coordinate_descent(starts, cost, deadline)
    row["tuning_s"] = time.perf_counter() - started
    row["tuning_trials"] = [{"config": config_entry(c), "ms": ms} for c, ms in trials]
    if best is not None:
        row["tuned_config"] = config_entry(best)
        row["tuned_ms"] = best_ms
        row["tuned_frac_of_floor"] = row["floor_ms"] / best_ms
        row["tuned_faster_than_grouped_mm"] = row.get("grouped_mm_ms") is not None and best_ms < row["grouped_mm_ms"]


def markdown(result: dict) -> str:
    def cell(ms, frac):
        return "-" if ms is None else f"{ms:.3f} ({frac:.0%})"

    lines = [
        f"# MoE kernel benchmark: {result['device']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}; copy bandwidth {result['bandwidth_TBps']:.2f} TB/s, "
        f"bf16 matmul {result['matmul_TFLOPs']:.0f} TFLOP/s; H={result['H']}, I={result['I']}, top-1, score on input.",
        "CUDA graphs for T <= 64. Times in ms (fraction of floor).",
        "",
        "| E | T | experts | floor | kernel | tuned | grouped_mm | dense | kernel path | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        tuned = "-" if r.get("tuned_ms") is None else f"{cell(r['tuned_ms'], r['tuned_frac_of_floor'])} {r['tuned_config']['path']}"
        lines.append(
            f"| {r['E']} | {r['T']} | {r['distinct_experts']} | {r['floor_ms']:.3f} "
            f"| {cell(r['kernel_ms'], r['kernel_frac_of_floor'])} | {tuned} "
            f"| {cell(r.get('grouped_mm_ms'), r.get('grouped_mm_frac_of_floor'))} "
            f"| {cell(r.get('dense_ms'), r.get('dense_frac_of_floor'))} "
            f"| {r['kernel_path']} | {r['max_rel_err']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/kernel_results.json"))
    p.add_argument("--E", type=int, nargs="+", default=list(E_VALUES))
    p.add_argument("--T", type=int, nargs="+", default=list(T_VALUES))
    p.add_argument("--H", type=int, default=H_LLAMA4)
    p.add_argument("--I", type=int, default=I_LLAMA4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dense-max-gib", type=float, default=16.0)
    p.add_argument("--tune", action="store_true", help="also search the launch parameters at every point")
    p.add_argument("--tune-budget-s", type=float, default=300.0, help="seconds of search over all points together")
    args = p.parse_args(argv)
    _require_gpu()

    import torch
    import triton

    from moec.common.artifacts import write_json_atomic

    t0 = time.perf_counter()
    bandwidth = measure_bandwidth_Bps()
    flops = measure_matmul_flops()
    print(f"{device_name()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    result = {
        "device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "bandwidth_TBps": bandwidth / 1e12, "matmul_TFLOPs": flops / 1e12, "H": args.H, "I": args.I,
        "rows": [],
    }
    tuning_spent = 0.0
    for E in args.E:
        # Weights of Llama-4 scale (~1/sqrt(fan_in)), generated on the GPU: 32 GiB for E=128.
        gen = torch.Generator(device=DEVICE).manual_seed(E)
        # In place: a second 21 GiB temporary would not fit beside the first on an 80 GB card.
        w1 = torch.randn(E, args.H, 2 * args.I, generator=gen, device=DEVICE, dtype=torch.bfloat16).div_(math.sqrt(args.H))
        w2 = torch.randn(E, args.I, args.H, generator=gen, device=DEVICE, dtype=torch.bfloat16).div_(math.sqrt(args.I))
        for T in args.T:
            # The budget not spent at a point rolls over to the points after it.
            points_left = len(args.T) * (len(args.E) - args.E.index(E)) - args.T.index(T)
            row = bench_point(E, T, (w1, w2), bandwidth, flops, args, (args.tune_budget_s - tuning_spent) / points_left)
            tuning_spent += row.get("tuning_s", 0.0)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            result["rows"].append(row)
        del w1, w2
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - t0
    write_json_atomic(args.out, result)
    md = args.out.with_suffix(".md")
    md.write_text(markdown(result))
    if args.tune:
        tuned_path = args.out.with_name(args.out.stem + "_tuned_configs.json")
        write_json_atomic(tuned_path, tuned_configs(result["device"], result["rows"], args.H, args.I))
        print(f"tuned launch parameters: {tuned_path} (use with MOEC_MOE_CONFIGS={tuned_path})")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
