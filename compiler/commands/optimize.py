"""``moec optimize``: a thin layer over ``moec.compiler.pipeline.optimize_onnx``."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import click

from moec.common import progress
from moec.common.errors import MoecError
from moec.compiler.commands.conventions import (json_out_option, moe_lowering_option, output_option, precision_option,
                                                target_option)
from moec.compiler.commands.quantize_options import quantize_fields, quantize_options


@click.command("optimize")
@click.argument("in_path", metavar="IN.onnx", type=click.Path(dir_okay=False, path_type=Path))
@output_option("out_path", "Optimized ONNX file to write; with --tp/--ep a folder for rank{r}.onnx and parallel.json.",
               old="--out")
@target_option("ort", several=False, needs_installed=False)
@moe_lowering_option(needs_installed=False)
@precision_option("Convert an fp32 export (routing stays fp32).")
@click.option("--dump-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write the graph after every phase here (graph only: weights become typed inputs).")
@json_out_option("report_path", "Write the pass report as JSON to this file.", old="--report")
@click.option("--require-fusion", is_flag=True, help="Fail when no MoE layer is fused.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, help="Tensor-parallel ranks (attention heads, MLPs).")
@click.option("--ep", type=click.IntRange(min=1), default=1, show_default=True, help="Expert-parallel ranks (routed experts).")
@quantize_options
def optimize(in_path, out_path, target, moe_lowering, precision, dump_dir, report_path, require_fusion, tp, ep,
             **quantize) -> None:
    """Fuse the MoE layers of IN.onnx, lower them for --target and write OUT.onnx (+ sidecar files)."""
    from rich.console import Console
    from rich.table import Table

    from moec.common.artifacts import write_json_atomic
    from moec.common.outputs import check_option_output, json_object_with
    from moec.compiler.pipeline import OptimizeConfig, check_writable, model_files, optimize_onnx

    if report_path is not None:
        # Checked before optimizing: a report that cannot be written must not fail the command
        # after OUT.onnx is already in place, nor replace one of the model's own files.
        check_option_output(report_path, "--json-out", kind="moec optimize report",
                            is_kind=json_object_with("in_path", "out_path", "passes"),
                            inputs=model_files(in_path) + model_files(out_path))
        check_writable(report_path)
    config = OptimizeConfig(target=target, moe_lowering=moe_lowering,
                            precision=precision, dump_dir=dump_dir, require_fusion=require_fusion,
                            **quantize_fields(**quantize))
    if tp * ep > 1:
        from moec.compiler.partition import ParallelConfig, optimize_partitioned

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = optimize_partitioned(in_path, out_path, config, ParallelConfig(tp=tp, ep=ep))
        lowered = ", ".join(f"{k} x{v}" for k, v in r.moe_lowering.items()) or "none"
        Console().print(f"moec optimize -> {r.out_dir}: {r.world_size} ranks (tp {tp} x ep {ep}), "
                        f"{', '.join(r.rank_files)}; lowered: {lowered}; {r.total_ms:.0f} ms")
        if report_path is not None:
            write_json_atomic(report_path, dataclasses.asdict(r))
        return
    if out_path.is_dir():
        raise MoecError(f"-o {out_path} is a folder; give the .onnx file to write (a folder is for --tp/--ep)")
    with warnings.catch_warnings(), progress.shown(f"moec optimize {in_path.name}"):
        warnings.simplefilter("ignore")  # the report carries them; printed below
        report = optimize_onnx(in_path, out_path, config)
    console = Console()
    table = Table(title=f"moec optimize -> {report.out_path} ({report.target})")
    table.add_column("phase")
    table.add_column("pass")
    table.add_column("matches", justify="right")
    table.add_column("ms", justify="right")
    for r in report.passes:
        table.add_row(r.phase, r.name, str(r.matches), f"{r.ms:.1f}")
    console.print(table)
    layers = "?" if report.moe_layers is None else str(report.moe_layers)
    lowered = ", ".join(f"{k} x{v}" for k, v in report.moe_lowering.items()) or "none"
    console.print(f"fused {report.fused_gating} gating / {report.fused_experts} expert ops for {layers} MoE layers; "
                  f"lowered: {lowered}; precision {report.precision}; {report.total_ms:.0f} ms")
    if report.vision is not None:
        v = report.vision
        ran = ", ".join(f"{r['name']} {r['matches']}" for r in v["passes"] if r["matches"]) or "no pass changed it"
        console.print(f"vision graph -> {v['out_name']}: precision {v['precision']}; {ran}; {v['total_ms']:.0f} ms")
    for r in report.refusals:
        console.print(f"[yellow]refused[/yellow] {r}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if report_path is not None:
        write_json_atomic(report_path, report.to_dict())
