"""``moec build``: an optimized graph to one TensorRT engine per arch (``moec.compiler.build``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from moec.compiler.commands.conventions import (
    BUILDER_FLAVOURS,
    arch_option,
    builder_option,
    layers_per_engine_option,
    output_option,
)
from moec.compiler.commands.inspect import _kv_line, _max_prompt, _profile_summary


@click.command("build")
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@output_option("out_dir", "Engine directory to write.", old="--out", file_okay=False)
@arch_option("sm89")
@builder_option()
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
@layers_per_engine_option()
def build(onnx_path, out_dir, archs, builder, shapes, max_batch, max_new_tokens, max_past, max_seq, timing_cache, opt_level,
          hardware_compat, version_compatible, workspace_mib, no_progress, layers_per_engine) -> None:
    """Build one TensorRT engine per --arch from MODEL.onnx into OUT_DIR (with manifest.json);
    MODEL.onnx may be a partition folder (moec optimize --tp/--ep): one engine folder per rank.

    Each engine has two optimization profiles: prefill (batch 1..max tuned at 1, new tokens
    1..--max-new-tokens tuned at a typical prompt of 128 or fewer, past 0..--max-past capped so new +
    past fit the positions, tuned at 0) and decode (new tokens exactly 1, past 1..--max-past tuned at
    the middle, batch 1..max tuned at half the max). The TensorRT runtime picks the profile per
    step. --shapes adjusts them (see its help); the manifest and `moec inspect` list both."""
    from moec.compiler.build import BuildConfig, build_engine

    config = BuildConfig(
        archs=archs, backend=BUILDER_FLAVOURS.get(builder), shapes=tuple(shapes),
        max_batch=max_batch, max_new_tokens=max_new_tokens, max_past=max_past, max_seq=max_seq, timing_cache=timing_cache,
        opt_level=opt_level, hardware_compat=hardware_compat, version_compatible=version_compatible,
        workspace_mib=workspace_mib, progress=not no_progress, layers_per_engine=layers_per_engine,
    )
    if onnx_path.is_dir():  # a partition folder (moec optimize --tp/--ep): one engine folder per rank
        if isinstance(layers_per_engine, int):
            from moec.common.errors import MoecError

            raise MoecError("--layers-per-engine builds one graph as a chain; a partition folder's ranks are built whole: "
                            "drop --layers-per-engine, or optimize without --tp/--ep")
        from moec.compiler.build.parallel import build_rank_engines

        m = build_rank_engines(onnx_path, out_dir, config)
        click.echo(f"built {m['world_size']} ranks (tp {m['tp']} x ep {m['ep']}) for {', '.join(m['archs'])} -> {out_dir}")
        for r in m["ranks"]:
            click.echo(f"  rank {r['rank']}: {r['dist_collective_layers']} DistCollective layers; "
                       + ", ".join(f"{e['file']} sha256 {e['sha256'][:16]}" for e in r["engines"]))
        return
    import dataclasses

    from moec.compiler.build.split import choose_engine_split

    split = choose_engine_split(onnx_path, layers_per_engine)
    if split.note:
        click.secho(f"{'note' if split.layers_per_engine else 'warning'}: {split.note}",
                    fg=None if split.layers_per_engine else "yellow", err=True)
    config = dataclasses.replace(config, engine_split=split.to_json())
    if split.layers_per_engine is not None:
        from moec.compiler.build.chain import build_layer_chain, format_chain

        click.echo(format_chain(build_layer_chain(onnx_path, out_dir, config, split.layers_per_engine), out_dir))
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
