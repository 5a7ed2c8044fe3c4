"""``moec verify``: the exported graph against the PyTorch model, prefill and decode."""

from __future__ import annotations

import json
from pathlib import Path

import click
from moec.common import progress
from moec.compiler.commands.conventions import CheckpointPath, dtype_option
from moec.compiler.commands.weights_options import allow_nonfinite_option


@click.command("verify")
@click.argument("checkpoint", type=CheckpointPath())
@dtype_option("[default: fp32; with --onnx: the graph's]")
@click.option("--atol", type=float, default=None, help="Absolute tolerance [default: per dtype].")
@click.option("--rtol", type=float, default=None, help="Relative tolerance [default: per dtype].")
@click.option("--decode-steps", type=int, default=None)
@click.option("--prompt-len", type=int, default=None,
              help="[default: crosses one or two attention chunks where that fits verify's memory budget, "
                   "else the longest prompt that fits; see moec.compiler.verify.default_prompt_len]")
@click.option("--batch", type=int, default=None)
@click.option("--onnx", "onnx_path", metavar="GRAPH.onnx", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check this moec graph of CHECKPOINT (an export, optimized, fused or quantized: its sidecar says "
                   "which) instead of a fresh export.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@allow_nonfinite_option
def verify(checkpoint, dtype, atol, rtol, decode_steps, prompt_len, batch, onnx_path, as_json, allow_nonfinite_weights):
    """Export CHECKPOINT (or take --onnx GRAPH.onnx) and compare ONNX Runtime with PyTorch on
    prefill and decode steps.

    Exits 1 when any output of any step is out of tolerance (an element fails when it exceeds
    both atol and rtol, as in Polygraphy)."""
    from moec.compiler.verify import VerifyConfig, format_report
    from moec.compiler.verify import verify as run_verify

    options = dict(dtype=dtype, atol=atol, rtol=rtol, decode_steps=decode_steps, prompt_len=prompt_len, batch=batch,
                   allow_nonfinite_weights=allow_nonfinite_weights or None)
    with progress.shown(f"moec verify {checkpoint.name}"):
        if onnx_path is not None:
            from moec.compiler.verify_graph import graph_dtype, verify_onnx

            options["dtype"] = dtype or graph_dtype(onnx_path)
            report = verify_onnx(checkpoint, onnx_path, VerifyConfig(**{k: v for k, v in options.items() if v is not None}))
        else:
            report = run_verify(checkpoint, VerifyConfig(**{k: v for k, v in options.items() if v is not None}))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    if not report.passed:
        raise SystemExit(1)
