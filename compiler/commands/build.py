"""``moec build``, ``moec inspect``, ``moec bench`` and ``moec gate``: thin layers over
``moec.compiler.build``, ``moec.runtime.bench`` and ``moec.compiler.gate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from moec.common import progress
from moec.compiler.commands.conventions import arch_option, json_out_option, output_option


@click.command("build")
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@output_option("out_dir", "Engine directory to write.", old="--out", file_okay=False)
@arch_option("sm89")
@click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default=None, help="TensorRT flavour (default: whichever imports, full TensorRT first).")
@click.option("--shapes", multiple=True,
              help="Profile override, trtexec-style (repeatable, or space separated): PROFILE:NAME:MIN,OPT,MAX with "
                   "PROFILE prefill or decode changes that tensor in that default profile only, e.g. "
                   "'prefill:input_ids:1x1,1x512,1x1024 prefill:position_ids:1x1,1x512,1x1024'; NAME:MIN,OPT,MAX "
                   "without a prefix replaces the two profiles with ONE custom profile (both phases' ranges, tuned for "
                   "decode) with those tensors overridden. Do not mix the two forms. Axes that share a name in the "
                   "graph (input_ids and position_ids; batch on every input) need the same opt.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, help="Profile max batch (default: the export's).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Prefill profile max new tokens per step (default: half the positions).")
@click.option("--max-past", type=click.IntRange(min=1), default=None, help="Decode profile max past length (default: positions - 1; prefill's past "
                                                         "is capped so new + past fit the positions).")
@click.option("--max-seq", type=click.IntRange(min=2), default=None,
              help="Engine context, prompt + generated (default: min(the export's positions, 8192)).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Timing cache file (created when missing).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimization level.")
@click.option("--hardware-compat", type=click.Choice(["none", "ampere+", "same-cc"]), default="none", show_default=True)
@click.option("--version-compatible", is_flag=True, help="Engine runs on later TensorRT versions of the same major (full TensorRT only).")
@click.option("--workspace", "workspace_mib", type=int, default=None, help="Workspace memory pool limit in MiB.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def build(onnx_path, out_dir, archs, backend, shapes, max_batch, max_new_tokens, max_past, max_seq, timing_cache, opt_level,
          hardware_compat, version_compatible, workspace_mib, no_progress) -> None:
    """Build one TensorRT engine per --arch from MODEL.onnx into OUT_DIR (with manifest.json);
    MODEL.onnx may be a partition folder (moec optimize --tp/--ep): one engine folder per rank.

    Each engine has two optimization profiles: prefill (batch 1..max tuned at 1, new tokens
    1..--max-new-tokens tuned at a typical prompt of 128 or fewer, past 0..--max-past capped so new +
    past fit the positions, tuned at 0) and decode (new tokens exactly 1, past 1..--max-past tuned at
    the middle, batch 1..max tuned at half the max). The TensorRT runtime picks the profile per
    step. --shapes adjusts them (see its help); the manifest and `moec inspect` list both."""
    from moec.compiler.build import BuildConfig, build_engine

    config = BuildConfig(
        archs=archs, backend=backend, shapes=tuple(shapes),
        max_batch=max_batch, max_new_tokens=max_new_tokens, max_past=max_past, max_seq=max_seq, timing_cache=timing_cache,
        opt_level=opt_level, hardware_compat=hardware_compat, version_compatible=version_compatible,
        workspace_mib=workspace_mib, progress=not no_progress,
    )
    if onnx_path.is_dir():  # a partition folder (moec optimize --tp/--ep): one engine folder per rank
        from moec.compiler.build_parallel import build_rank_engines

        m = build_rank_engines(onnx_path, out_dir, config)
        click.echo(f"built {m['world_size']} ranks (tp {m['tp']} x ep {m['ep']}) for {', '.join(m['archs'])} -> {out_dir}")
        for r in m["ranks"]:
            click.echo(f"  rank {r['rank']}: {r['dist_collective_layers']} DistCollective layers; "
                       + ", ".join(f"{e['file']} sha256 {e['sha256'][:16]}" for e in r["engines"]))
        return
    result = build_engine(onnx_path, out_dir, config)
    for note in result.warnings:
        click.secho(f"warning: {note}", fg="yellow", err=True)
    m = result.manifest
    click.echo(f"built {len(m['engines'])} engine(s) for {', '.join(m['archs'])} with {m['trt']['flavour']} "
               f"{m['trt']['version']} ({m['precision']}, {result.seconds:.1f} s) -> {result.out_dir}")
    click.echo(f"  profiles: {_profile_summary(m)}")
    click.echo(f"  max prompt: {_max_prompt(m)}")
    click.echo(f"  context: {m['limits']['max_positions']} positions{m.get('context_note', '')}")
    if m.get("memory"):
        from moec.compiler.plan import format_engine_memory

        click.echo(f"  {format_engine_memory(m['memory'])}")
    if "kv_cache" in m:
        click.echo(f"  {_kv_line(m)}")
    for e in m["engines"]:
        click.echo(f"  {e['file']}: {e['bytes'] / 2**20:.2f} MiB, sha256 {e['sha256'][:16]}")


@click.command("inspect")
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
def inspect(engine_dir, as_json) -> None:
    """Print an engine directory's manifest, its engines' I/O tensors and layer information.
    Exits 2 when an engine does not match the manifest (sha256, or a header that names another
    TensorRT version or arch), so scripts can use it as a check."""
    from moec.common.errors import MoecError
    from moec.common import contract
    from moec.compiler.build import inspect_engine_dir

    if (engine_dir / contract.PARALLEL_MANIFEST).is_file():
        from moec.compiler.build_parallel import inspect_rank_engines

        report = inspect_rank_engines(engine_dir)
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            par = report["parallel"]
            click.echo(f"{engine_dir}: {par['world_size']} ranks (tp {par['tp']} x ep {par['ep']}), partition "
                       f"{par['partition_id']}, archs {', '.join(par['archs'])}")
            for rank, r in enumerate(report["ranks"]):
                click.echo(f"\n--- rank {rank} ---")
                _print_inspection(r)
    else:
        report = inspect_engine_dir(engine_dir)
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            _print_inspection(report)
    if report["problems"]:
        raise MoecError(f"{engine_dir} failed inspection: " + "; ".join(report["problems"]))


def _profile_summary(manifest) -> str:
    """One line per engine's profiles: name (index) with the input_ids and past ranges."""
    parts = []
    for p in manifest["profiles"]:
        ids = p["shapes"].get("input_ids", {})
        # The full caches' past range (a chunked layer's ring has a fixed size: see the KV line).
        pasts = [r for n, r in p["shapes"].items() if n.startswith("past_key.")]
        past = next((r for r in pasts if r["min"][2] != r["max"][2]), pasts[0] if pasts else None)
        text = f"{p['name']} (#{p['index']}) batch x new_tokens {ids.get('min')}..{ids.get('max')} opt {ids.get('opt')}"
        if past:
            text += f", past_len {past['min'][2]}..{past['max'][2]} opt {past['opt'][2]}"
        parts.append(text)
    return "; ".join(parts)


def _kv_line(manifest) -> str:
    from moec.common.kv_cache import format_kv_bytes

    kv = manifest["kv_cache"]
    return format_kv_bytes(kv["bytes_per_sequence"], kv["context"])


def _max_prompt(manifest) -> str:
    from moec.runtime.trt_backend import engine_profiles, max_prompt_tokens, ring_inputs

    profiles = engine_profiles(manifest)
    chunk = max(p.ranges["input_ids"][1][1] for p in profiles)
    n = max_prompt_tokens(profiles, manifest["limits"]["max_positions"], rings=ring_inputs(manifest))
    return f"{n} tokens (prefilled in chunks of up to {chunk})"


def _grouped_ranges(shapes):
    """(label, ranges) rows; the per-layer past tensors that share one range become one row
    ("past K/V (96)"), so a 48-layer model's profile stays readable."""
    rows, past = [], {}
    for name, r in shapes.items():
        if name.startswith(("past_key.", "past_value.")):
            past.setdefault(json.dumps(r), []).append(name)
        else:
            rows.append((name, r))
    for key, names in past.items():
        rows.append((names[0] if len(names) == 1 else f"past K/V ({len(names)})", json.loads(key)))
    return rows


def _print_inspection(report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = report["manifest"]
    summary = Table(title="manifest", show_header=False)
    for key, value in (
        ("TensorRT", f"{m['trt']['flavour']} {m['trt']['version']}"), ("archs", ", ".join(m["archs"])),
        ("precision", f"{m['precision']} (strongly typed)"), ("limits", json.dumps(m["limits"])),
        ("plugins", ", ".join(f"{p['namespace']}::{p['name']} v{p['version']}" for p in m["plugins"]) or "none"),
        ("source", f"{m['source_onnx']['file']} sha256 {m['source_onnx']['sha256'][:16]}"),
        ("moec", m["moec_version"]), ("built", f"{m['built_at']} in {m['build_seconds']} s"),
        ("network layers", f"{m['network_layers']['count']}: " + ", ".join(f"{k} {v}" for k, v in m["network_layers"]["by_type"].items())),
    ):
        summary.add_row(key, value)
    console.print(summary)
    # Profiles are the same for every engine of the directory (one build configuration).
    # Dims written as --shapes takes them (trtexec's 1x2x0x4), which also keeps the table narrow.
    profiles = Table("profile", "input", "min", "opt", "max", title="optimization profiles (TensorRT index order)")
    for p in m["profiles"]:
        for i, (name, r) in enumerate(_grouped_ranges(p["shapes"])):
            profiles.add_row(f"{p['name']} #{p['index']}" if i == 0 else "", name, *("x".join(map(str, r[k])) for k in ("min", "opt", "max")))
    console.print(profiles)
    console.print(f"max prompt: {_max_prompt(m)}")
    if "kv_cache" in m:
        console.print(_kv_line(m))
    # Every engine of a directory comes from one network: its I/O table is printed once, unless
    # deserialized engines report different I/O.
    printed_io = None
    for engine in report["engines"]:
        h = engine["header"]
        status = "[green]ok[/]" if engine["sha256_ok"] else "[red]MISMATCH[/]"
        console.print(f"[bold]{engine['file']}[/] archs {', '.join(engine['archs'])}; sha256 {status}; header: "
                      f"{h.get('flavour')} {h.get('version', '?')} for {', '.join(h.get('archs', [])) or '?'}")
        for problem in engine.get("problems", []):
            console.print(f"  [red]{problem}[/]")
        if not engine["deserialized"]:
            console.print(f"  [yellow]not deserialized: {engine['reason']}[/]")
        rows = engine.get("io") or [dict(t, mode="input") for t in m["io"]["inputs"]] + [dict(t, mode="output") for t in m["io"]["outputs"]]
        if rows != printed_io:
            source = "engine" if engine.get("io") else "network, from the manifest"
            io = Table("tensor", "mode", "dtype", "shape", title=f"I/O tensors ({source})")
            for t in rows:
                io.add_row(t["name"], t["mode"], t["dtype"], str(t["shape"]))
            console.print(io)
            printed_io = rows
        else:
            console.print("  I/O tensors: as above")
        if "num_profiles" in engine:
            console.print(f"  the engine holds {engine['num_profiles']} optimization profile(s)")
        if engine.get("layers"):
            # With ProfilingVerbosity.DETAILED (set at build) each layer is a dict; otherwise a name.
            layers = Table("#", "layer", "type", "outputs")
            for i, layer in enumerate(engine["layers"]):
                if isinstance(layer, dict):
                    outs = ", ".join(f"{o.get('Name')}:{o.get('Format/Datatype', '')}" for o in layer.get("Outputs", []))
                    layers.add_row(str(i), str(layer.get("Name", "")), str(layer.get("LayerType", "")), outs[:120])
                else:
                    layers.add_row(str(i), str(layer), "", "")
            console.print(layers)


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
            from moec.compiler.gate_paired import PAIRED_BETTER, all_decided, look_confidence
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


class _stdout_may_close:
    """A reader that stops early (`moec bench ... | head`) closes stdout: the bench's work is done
    and written, so that ends the printing quietly, with exit 0."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        # rich turns a broken pipe into SystemExit(1) itself (after pointing stdout at /dev/null).
        rich_exit = kind is not None and issubclass(kind, SystemExit) and isinstance(value.__context__, BrokenPipeError)
        if rich_exit:
            return True
        if kind is None or not issubclass(kind, BrokenPipeError):
            return False
        import os

        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail.
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), sys.stdout.fileno())
        return True


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
    from moec.compiler.gate import (GateConfig, gate as run_gate, noisy_message, parse_percent, print_report,
                                    write_junit, write_junit_error)

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
