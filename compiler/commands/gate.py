"""``moec gate``: a bench result against a baseline, as a CI verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from moec.compiler.commands.build import _stdout_may_close


@click.command("gate")
@click.argument("result_path", metavar="RESULT.json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--baseline", "baseline_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A stored result to compare with (trend mode); without it RESULT.json must be a paired result "
                   "(`moec bench NEW --against OLD`).")
@click.option("--max-regression", default="5%", show_default=True,
              help="Allowed slowdown: a percentage (5%) or a fraction below 1 (0.05); a bare 5 is refused.")
@click.option("--max-noise", default="25%", show_default=True,
              help="Stored-baseline mode: widest noise band to decide on; a noisier metric makes the gate refuse to decide (exit 2).")
@click.option("--metric", "metrics", multiple=True, help="Metric to gate on (repeatable; default: all).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write JUnit XML here (also when the gate cannot decide: one <error> case).")
@click.option("--allow-different-device", is_flag=True, help="Compare results from different devices, hosts or software versions.")
def gate(result_path, baseline_path, max_regression, max_noise, metrics, junit_path, allow_different_device) -> None:
    """Judge RESULT.json: a paired result on its own, or a single one against --baseline. Exit 0
    pass, 1 regression, 2 undecided or cannot compare (different model, settings or device,
    missing metric, malformed file, too noisy)."""
    from moec.common.errors import MoecError
    from moec.common.outputs import check_option_output, is_moec_junit
    from moec.compiler.gate import (
        GateConfig,
        noisy_message,
        parse_percent,
        print_report,
        write_junit,
        write_junit_error,
    )
    from moec.compiler.gate import gate as run_gate

    if junit_path is not None:
        # Before anything else: the error report below is written there too.
        check_option_output(junit_path, "--junit", kind="moec gate JUnit file", is_kind=is_moec_junit,
                            inputs=[p for p in (result_path, baseline_path) if p is not None])
    try:
        config = GateConfig(max_regression=parse_percent(max_regression, "--max-regression"),
                            max_noise=parse_percent(max_noise, "--max-noise"), metrics=tuple(metrics),
                            allow_different_device=allow_different_device)
        report = run_gate(result_path, baseline_path, config)
    except MoecError as e:
        if junit_path is not None:
            write_junit_error(str(e), junit_path)
        raise
    if junit_path is not None:
        write_junit(report, junit_path)
    with _stdout_may_close():
        print_report(report)
    if report.regressions:
        click.secho(f"performance regression in {', '.join(v.metric for v in report.regressions)}", fg="red", err=True)
        if report.undecided:
            click.secho(f"warning: {noisy_message(report, config)}", fg="yellow", err=True)
        sys.exit(1)
    if report.undecided:
        raise MoecError(noisy_message(report, config))
