"""One spelling per concept across every ``moec`` command, as trtexec and Polygraphy users expect.

- ``-o/--output``: what the command writes (a file or a folder).
- ``--json``: the command's result as JSON on stdout (a flag); ``--json-out FILE``: the same JSON
  written to a file, where the command has one to keep (bench, optimize).
- ``--dtype`` (export dtype / torch dtype), ``--precision`` (a cast in optimize), ``--moe-lowering``:
  click.Choice with the same values wherever they mean the same.
- archs and targets: ``moec.common.archs`` (GPU names accepted; help lists what the installed
  TensorRT can build).
- ``--builder trt|trt-rtx`` (moec build): which TensorRT builds the engines, spelled as the kinds of
  ``--target trt:<arch>|trt-rtx:<arch>``; ``--backend`` is what RUNS an artifact (run, bench:
  torch|ort|trt). build's old ``--backend tensorrt|tensorrt-rtx`` is the deprecated spelling.

Old spellings stay for one release as hidden options that print one ``note:`` line on stderr.
tests/compiler/test_cli_conventions.py holds every command to this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

DTYPES = ("fp32", "fp16", "bf16")
# Spellings ``moec run --dtype`` took while it was free text (torch's names).
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
REMOVED_IN = "the next release"


def deprecation_note(old: str, new: str) -> None:
    click.echo(f"note: {old} is deprecated and goes in {REMOVED_IN}; use {new}", err=True)


class AliasedChoice(click.Choice):
    """A Choice that still takes old spellings of its values (``float16`` for ``fp16``), with a
    deprecation note; help and errors list only the current values."""

    def __init__(self, choices, aliases: dict[str, str], option: str, **kw):
        super().__init__(list(choices), **kw)
        self.aliases = aliases
        self.option = option

    def convert(self, value: Any, param, ctx):
        if isinstance(value, str) and value in self.aliases:
            deprecation_note(f"{self.option} {value}", f"{self.option} {self.aliases[value]}")
            value = self.aliases[value]
        return super().convert(value, param, ctx)


def _given(value: Any) -> bool:
    return value is not None and value != () and value is not False


def renamed_from(old: str, new: str, dest: str, convert: Callable[[Any], Any] | None = None, **kw) -> Callable:
    """A hidden option ``old`` that fills ``dest`` (the option now spelled ``new``) and says so once.
    Give the new option ``callback=keeps_renamed(dest)`` so a value that came this way is kept.
    ``convert``: the old value in the new option's terms (a value renamed with the option); click
    keeps what this callback stores, so the conversion happens here."""

    def take(ctx: click.Context, param, value):
        if not _given(value):
            return
        deprecation_note(old, new)
        if _given(ctx.params.get(dest)):
            raise click.UsageError(f"{new} is given twice (once as its old spelling {old}); give it once", ctx=ctx)
        ctx.params[dest] = convert(value) if convert is not None else value
        ctx.meta[f"moec.renamed.{dest}"] = old

    return click.option(old, f"{dest}__{old.lstrip('-').replace('-', '_')}", hidden=True, expose_value=False,
                        callback=take, **kw)


def keeps_renamed(dest: str, required: bool = False, then: Callable | None = None) -> Callable:
    """Callback of an option with an old spelling: options given on the command line are
    processed first, so a value the old spelling brought is in ``ctx.params`` already."""

    def callback(ctx: click.Context, param, value):
        old = ctx.meta.get(f"moec.renamed.{dest}")
        if old is not None:
            if ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{param.opts[-1]} is given twice (once as its old spelling {old}); give it once",
                                       ctx=ctx)
            value = ctx.params[dest]
        if required and not _given(value):
            raise click.MissingParameter(ctx=ctx, param=param)
        return then(ctx, param, value) if then is not None else value

    return callback


def output_option(dest: str, help: str, *, old: str | None = None, required: bool = True, **type_kw) -> Callable:
    """``-o/--output`` (and its old spelling ``old``, e.g. ``--out``)."""
    path = click.Path(path_type=Path, **type_kw)

    def decorate(fn):
        if old is not None:
            fn = renamed_from(old, "-o/--output", dest, type=path)(fn)
            return click.option("-o", "--output", dest, type=path, default=None, help=help + (" [required]" if required else ""),
                                callback=keeps_renamed(dest, required=required))(fn)
        return click.option("-o", "--output", dest, type=path, required=required, help=help)(fn)

    return decorate


def json_option(help: str = "Print the result as JSON on stdout.") -> Callable:
    return click.option("--json", "as_json", is_flag=True, help=help)


def json_out_option(dest: str, help: str, *, old: str | None = None) -> Callable:
    """``--json-out FILE`` (and its old spelling ``old``)."""
    path = click.Path(dir_okay=False, path_type=Path)

    def decorate(fn):
        if old is not None:
            fn = renamed_from(old, "--json-out", dest, type=path)(fn)
        return click.option("--json-out", dest, type=path, default=None, help=help,
                            callback=keeps_renamed(dest) if old is not None else None)(fn)

    return decorate


def dtype_option(help: str, default: str | None = None) -> Callable:
    return click.option("--dtype", type=AliasedChoice(DTYPES, DTYPE_ALIASES, "--dtype"), default=default,
                        show_default=default is not None, help=help)


def precision_option(help: str) -> Callable:
    return click.option("--precision", type=click.Choice(list(DTYPES)), default=None, help=help)


def reachable_lowerings(needs_installed: bool) -> list[str]:
    """The MoE lowerings a command can produce here. trt-native and trt-plugin exist only for
    full TensorRT targets, so a command that builds engines offers them only where it is installed."""
    from moec.common.archs import installed
    from moec.passes.targets import LOWERINGS

    full_trt_only = ("trt-native", "trt-plugin")
    return [lo for lo in LOWERINGS if not (needs_installed and lo in full_trt_only and not installed("trt"))]


def moe_lowering_option(needs_installed: bool,
                        help: str = "How fused MoE layers run; auto: the target's fastest valid lowering.") -> Callable:
    return click.option("--moe-lowering", type=click.Choice(["auto", *reachable_lowerings(needs_installed)]),
                        default="auto", show_default=True, help=help,
                        callback=lambda ctx, param, v: None if v == "auto" else v)


# moec build --builder: the TensorRT flavours as --target names them (moec.common.archs.STATIC_ARCHS),
# and what build's old --backend called them (moec.compiler.build.BuildConfig.backend still does).
BUILDERS = ("trt", "trt-rtx")
OLD_BUILDER_NAMES = {"tensorrt": "trt", "tensorrt-rtx": "trt-rtx"}
BUILDER_FLAVOURS = {new: old for old, new in OLD_BUILDER_NAMES.items()}


def builder_option() -> Callable:
    """``--builder trt|trt-rtx`` (and build's old ``--backend tensorrt|tensorrt-rtx``, with a note)."""

    def decorate(fn):
        fn = renamed_from("--backend", "--builder trt|trt-rtx", "builder", convert=OLD_BUILDER_NAMES.get,
                          type=click.Choice(list(OLD_BUILDER_NAMES)))(fn)
        return click.option("--builder", type=click.Choice(list(BUILDERS)), default=None,
                            help="Which TensorRT builds the engines, as --target names it [default: whichever imports, "
                                 "full TensorRT first].", callback=keeps_renamed("builder"))(fn)

    return decorate


class LazyHelpOption(click.Option):
    """An option whose help is written when --help is shown: what the installed TensorRT can
    build is asked of its module then, not at every start of the CLI."""

    def __init__(self, *args, help_fn: Callable[[], str], **kw):
        super().__init__(*args, **kw)
        self.help_fn = help_fn

    def get_help_record(self, ctx):
        self.help = self.help_fn()
        return super().get_help_record(ctx)


def _target_help(kinds: tuple[str, ...], several: bool) -> str:
    from moec.common.archs import FLAVOUR_NAMES, arch_help, installed

    text = " | ".join(["ort", *(f"{k}:<arch>" for k in kinds)]) + "".join(f"; {arch_help(k)}" for k in kinds) + "."
    if several:
        text += " Several archs: trt-rtx:sm80,sm89 or a repeated --target, an engine each."
    missing = [f"{FLAVOUR_NAMES[k]} ({k}:<arch>)" for k in ("trt-rtx", "trt") if k not in kinds and not installed(k)]
    return text + (f" Not installed here: {', '.join(missing)}." if missing else "")


def target_option(default: str, *, several: bool, needs_installed: bool) -> Callable:
    """``--target``. ``several``: repeated targets of one kind accumulate into one comma list
    (``moec compile``); otherwise a second --target is refused. ``needs_installed``: the help
    lists only the TensorRT flavours installed here (targets that build engines)."""
    from moec.common.archs import installed

    def kinds() -> tuple[str, ...]:
        return tuple(k for k in ("trt-rtx", "trt") if not needs_installed or installed(k))

    def join(ctx, param, values):
        values = tuple(values) or (default,)
        if len(values) == 1:
            return values[0]
        if not several:
            raise click.BadParameter(f"given {len(values)} times ({', '.join(values)}); this command writes one graph "
                                     "for one target", ctx=ctx, param=param)
        heads = {v.partition(":")[0] for v in values}
        if len(heads) > 1 or "ort" in heads:
            raise click.BadParameter(f"{', '.join(values)}: one compile builds one kind of target; run it once per kind",
                                     ctx=ctx, param=param)
        return f"{heads.pop()}:" + ",".join(v.partition(":")[2] for v in values)

    return click.option("--target", cls=LazyHelpOption, multiple=True, default=(), callback=join,
                        help_fn=lambda: _target_help(kinds(), several) + f"  [default: {default}]")


def arch_option(default: str) -> Callable:
    """``moec build --arch``: comma separated or repeated (accumulated), GPU names accepted."""
    from moec.common.archs import arch_help, installed, split_archs

    def help_fn() -> str:
        kinds = [k for k in ("trt-rtx", "trt") if installed(k)]
        offered = "; ".join(arch_help(k) for k in kinds) or "no TensorRT is installed here"
        return f"Target GPU archs, comma separated or repeated, an engine each ({offered}).  [default: {default}]"

    return click.option("--arch", "archs", cls=LazyHelpOption, multiple=True, default=(), help_fn=help_fn,
                        callback=lambda ctx, param, v: tuple(a for text in (v or (default,)) for a in split_archs(text)))


class CheckpointPath(click.ParamType):
    """A checkpoint folder, or a Hugging Face Hub id found in the local cache (moec.common.hub)."""

    name = "checkpoint"

    def convert(self, value, param, ctx):
        from moec.common.hub import resolve_checkpoint

        return value if isinstance(value, Path) else resolve_checkpoint(value)


class LayersPerEngine(click.ParamType):
    """``--layers-per-engine``: N (a chain of N-layer engines), ``all`` (one engine) or ``auto``
    (None: compiler/build/split.py chooses by the host's memory)."""

    name = "N|all|auto"

    def convert(self, value, param, ctx):
        from moec.compiler.build.split import AUTO, ONE_ENGINE

        if value is None or isinstance(value, int) or value == ONE_ENGINE:
            return value
        if value == AUTO:
            return None
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r}: give a layer count of at least 1, {ONE_ENGINE} or {AUTO}", param, ctx)
        return n


def layers_per_engine_option() -> Callable:
    """``moec build`` / ``moec compile --layers-per-engine``: the same values and default on both."""
    return click.option(
        "--layers-per-engine", type=LayersPerEngine(), default=None, metavar="N|all|auto",
        help="Build a chain of engines of N layers each, one after another, so the build's host memory is about 1.8x "
             "one engine's weights instead of the model's; 'all' forces one engine. [default: auto: one engine when "
             "its estimated build memory fits the host's available memory, else the chain with the most layers per "
             "engine that fits, said in one line]")
