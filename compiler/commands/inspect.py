"""``moec inspect``: what an engine folder holds, checked against its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("inspect")
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
def inspect(engine_dir, as_json) -> None:
    """Print an engine directory's manifest, its engines' I/O tensors and layer information.
    Exits 2 when an engine does not match the manifest (sha256, or a header that names another
    TensorRT version or arch), so scripts can use it as a check."""
    from moec.common import contract
    from moec.common.errors import MoecError
    from moec.compiler.build import inspect_engine_dir

    if (engine_dir / contract.PARALLEL_MANIFEST).is_file():
        from moec.compiler.build.parallel import inspect_rank_engines

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
    elif (engine_dir / contract.LAYER_CHAIN_MANIFEST).is_file():
        from moec.compiler.build.chain import format_chain, inspect_layer_chain, load_layer_chain

        report = inspect_layer_chain(engine_dir)
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            click.echo(format_chain(load_layer_chain(engine_dir)[0], engine_dir).replace("built ", "", 1))
            for r, sub in zip(report["ranges"], report["range_reports"]):
                click.echo(f"\n--- layers {r['layers'][0]}-{r['layers'][1] - 1} ({r['dir']}/) ---")
                _print_inspection(sub)
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
