"""``moec bench``: latency of an artifact, alone or paired against another."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from moec.common import progress
from moec.compiler.commands.build import _stdout_may_close
from moec.compiler.commands.conventions import (
    json_out_option,
)


@click.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@json_out_option("json_out", "Write the result JSON to this file.", old="--json")
@click.option("--against", "against", type=click.Path(path_type=Path), default=None,
              help="A second artifact (OLD) to time in the same process, interleaved with ARTIFACT (NEW) round by "
                   "round; `moec gate` judges the result without --baseline.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default=None, help="Default: from the artifact (.onnx -> ort, engine dir -> trt).")
@click.option("--prompt-len", type=int, default=32, show_default=True)
@click.option("--gen-len", type=int, default=32, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed repeats (single bench).")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of ONNX Runtime and torch (default: OMP_NUM_THREADS, else every core); recorded.")
@click.option("--max-time", type=float, default=35.0, show_default=True,
              help="With --against: seconds of timed rounds at most.")
@click.option("--rounds", "min_rounds", type=int, default=30, show_default=True,
              help="With --against: rounds of the first early look (the next at 4x); none stops before.")
@click.option("--max-regression", default="5%", show_default=True,
              help="With --against: stop early once every metric's verdict at this threshold is decided (give the gate the same).")
@click.option("--rank-timeout", type=click.FloatRange(min=1), default=None,
              help="Partition folders: seconds a rank waits for a silent peer before all stop [default: 120].")
def bench(artifact, json_out, against, backend, prompt_len, gen_len, batch, repeats, warmup, threads, max_time,
          min_rounds, max_regression, rank_timeout) -> None:
    """Time prefill and decode of ARTIFACT (.onnx or engine dir): latency percentiles and the tokens/s they give.

    With --against OLD, both artifacts run in this process in alternating rounds (NEW, OLD, OLD,
    NEW, ...) on the same prompt until --max-time, or until the paired verdict is decided."""
    from moec.runtime.bench import BenchConfig, check_result_path

    if json_out is not None:
        from moec.common.outputs import check_option_output, json_object_with

        check_result_path(json_out, artifact)
        if against is not None:
            check_result_path(json_out, against)
        check_option_output(json_out, "--json-out", kind="moec bench result",
                            is_kind=json_object_with("metrics", format_prefix="moec.bench/"))
    config = BenchConfig(prompt_len, gen_len, batch, repeats, warmup, threads=threads, rank_timeout_s=rank_timeout)
    # Redrawn only between measurements: no refresh thread runs while a step is timed.
    with progress.shown(f"moec bench {artifact.name}", live=False):
        if against is None:
            from moec.runtime.bench import bench_artifact

            result = bench_artifact(artifact, config, backend)
        else:
            from moec.compiler.gate import parse_percent
            from moec.compiler.gate_paired import (
                PAIRED_BETTER,
                all_decided,
                look_confidence,
            )
            from moec.runtime.bench_paired import PairedConfig, bench_paired

            threshold = parse_percent(max_regression, "--max-regression")
            paired = PairedConfig(config, max_time=max_time, min_rounds=min_rounds)
            confidence = look_confidence(paired.looks)
            result = bench_paired(artifact, against, paired, backend,
                                  decided=lambda ratios: all_decided(ratios, PAIRED_BETTER, threshold, confidence))
    # The result is on disk before anything is printed, so a closed stdout (`| head`) cannot lose it.
    if json_out is not None:
        _write_result(json_out, result)
    with _stdout_may_close():
        _print_bench(artifact, against, result)
        if json_out is not None:
            click.echo(f"wrote {json_out}")


def _write_result(path: Path, result) -> None:
    from moec.common.artifacts import write_json_atomic
    from moec.common.errors import MoecError

    try:
        write_json_atomic(path, result)
    except OSError as e:
        raise MoecError(f"cannot write the bench result {path}: {e.strerror or e}; choose a writable location") from e


def _print_bench(artifact, against, result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"moec bench {artifact} ({result['artifact']['kind']}, {result['backend'].get('device', '')}, " \
            f"{result['config']['threads']} threads)"
    blocks = [("", result["metrics"])]
    if against is not None:
        p = result["paired"]
        title += f" against {against}: {p['rounds']} rounds in {p['seconds']:.1f} s (stop: {p['stop']})"
        blocks = [("NEW ", result["metrics"]), ("OLD ", result["against_metrics"])]
    table = Table(title=title)
    for col in ("metric", "p50", "slow 10%", "slow 1%"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for prefix, metrics in blocks:
        for name, m in metrics.items():
            tails = ("p90", "p99") if m["better"] == "lower" else ("p10", "p1")
            table.add_row(prefix + name, *(f"{m[k]:.4g}" for k in ("p50", *tails)))
    console.print(table)
    console.print("slow 10% / 1%: p90 / p99 of a latency, p10 / p1 of a throughput (the same steps' inverse)")
    sys.stdout.flush()
