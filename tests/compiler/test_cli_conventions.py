"""Every command follows one set of CLI conventions (compiler/commands/conventions.py), its help
offers only values this machine can reach, and README's command table says what --help says."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from moec.common import archs
from moec.compiler.cli import cli

README = Path(__file__).resolve().parents[2] / "README.md"
COMMANDS = dict(cli.commands)


def visible_options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden]


def long_names(option: click.Option) -> list[str]:
    return [o for o in option.opts + option.secondary_opts if o.startswith("--")]


def parse(command: str, args: list[str]) -> dict:
    """The parameters ``moec COMMAND ARGS`` would run with (callbacks run, the command does not)."""
    with COMMANDS[command].make_context(command, [str(a) for a in args]) as ctx:
        return dict(ctx.params)


def help_text(command: str) -> str:
    ctx = click.Context(COMMANDS[command], info_name=command)
    return COMMANDS[command].get_help(ctx)


# --- One long name per concept -------------------------------------------------------------------
# Spellings the conventions replaced; none may be a visible option of any command.
RETIRED = {"--out", "--report", "--output-dir", "--outdir", "--json-file", "--lowering", "--precision-mode"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_one_spelling_per_concept(name):
    command = COMMANDS[name]
    for option in visible_options(command):
        names = long_names(option)
        assert not set(names) & RETIRED, (name, names)
        if "-o" in option.opts:
            assert names == ["--output"], (name, option.opts)  # -o is always --output
        if "--output" in names:
            assert "-o" in option.opts, name
        if "--json" in names:  # prints JSON on stdout: a flag, never a file
            assert option.is_flag and option.name == "as_json", name
        if "--json-out" in names:
            assert not option.is_flag and isinstance(option.type, click.Path), name


@pytest.mark.parametrize("flag", ["--dtype", "--precision"])
def test_dtype_and_precision_are_the_same_choice_everywhere(flag):
    from moec.compiler.commands.conventions import DTYPES
    from moec.compiler.export import DTYPES as EXPORT_DTYPES
    from moec.compiler.pipeline import PRECISIONS
    from moec.compiler.verify import DEFAULT_TOLERANCES

    assert DTYPES == EXPORT_DTYPES == PRECISIONS == tuple(DEFAULT_TOLERANCES)
    users = [(name, o) for name, c in COMMANDS.items() for o in visible_options(c) if flag in long_names(o)]
    assert len(users) >= 2
    for name, option in users:
        assert isinstance(option.type, click.Choice), (name, flag)
        assert tuple(option.type.choices) == DTYPES, (name, flag)


def test_moe_lowering_offers_only_lowerings_some_reachable_target_runs():
    from moec.passes.targets import KINDS, Target, unsupported_reason

    for name, command in COMMANDS.items():
        for option in visible_options(command):
            if "--moe-lowering" not in long_names(option):
                continue
            assert isinstance(option.type, click.Choice) and option.type.choices[0] == "auto", name
            builds = name == "compile"  # optimize writes graphs for any target; compile builds engines here
            kinds = [k for k in KINDS if k == "ort" or not builds or archs.installed(k)]
            targets = [Target(k, a) for k in kinds for a in ((None,) if k == "ort" else archs.buildable_archs(k))]
            for lowering in option.type.choices[1:]:
                assert any(unsupported_reason(t, lowering) is None for t in targets), (name, lowering)


def test_presets_and_plan_gpus_come_from_their_tables():
    from moec.compiler.commands.checkpoint import DEMO_PRESETS, RANDOM_PRESETS, SMOLLM2_PRESET
    from moec.compiler.plan import GPUS
    from moec.models.smollm2 import PRESET
    from moec.models import PRESETS

    import math

    import torch

    from moec.models import Llama4ForCausalLM
    from moec.models.demo import MAX_DEMO_PARAMS

    def params(config) -> int:
        with torch.device("meta"):
            return sum(math.prod(p.shape) for p in Llama4ForCausalLM(config).parameters())

    preset = next(o for o in visible_options(COMMANDS["demo-checkpoint"]) if o.name == "preset")
    reachable = tuple(name for name, config in PRESETS.items() if params(config) <= MAX_DEMO_PARAMS)
    assert RANDOM_PRESETS == reachable == ("llama4-tiny",) and SMOLLM2_PRESET == PRESET
    assert tuple(preset.type.choices) == DEMO_PRESETS == (*RANDOM_PRESETS, SMOLLM2_PRESET)
    for gpu in GPUS.values():  # plan's memory table and the arch table name each GPU's arch alike
        assert archs.normalize_arch(gpu.name) == f"sm{gpu.sm}", gpu.name


# --- Archs and targets -----------------------------------------------------------------------------
def test_gpu_names_map_to_their_archs():
    expect = {"h100": "sm90", "h200": "sm90", "a100": "sm80", "l4": "sm89", "rtx4090": "sm89", "rtx5090": "sm120",
              "orin": "sm87", "thor": "sm110", "b200": "sm100", "RTX 4090": "sm89", "8.9": "sm89", "SM_89": "sm89"}
    assert {g: archs.normalize_arch(g) for g in expect} == expect
    with pytest.raises(Exception, match="unknown arch gpu9"):
        archs.normalize_arch("gpu9")


def test_tensorrt_rtx_archs_are_asked_of_the_module():
    trt = pytest.importorskip("tensorrt_rtx")
    offered = [n.lower() for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
    assert list(archs.buildable_archs("trt-rtx")) == sorted(offered, key=archs.arch_key)
    assert "sm90" not in offered and "sm100" not in offered  # FACTS.md: what the help must not offer


@pytest.mark.parametrize("command, option", [("compile", "target"), ("build", "archs"), ("optimize", "target")])
def test_arch_help_lists_only_buildable_archs(command, option):
    """compile and build offer the archs of the TensorRT installed here; optimize (a graph for any
    target) those of both flavours. Each list is all of what the flavour builds."""
    param = next(p for p in COMMANDS[command].params if p.name == option)
    text = param.help_fn()
    assert param.get_help_record(click.Context(COMMANDS[command]))[1].startswith(text[:40])
    kinds = [k for k in ("trt-rtx", "trt") if command == "optimize" or archs.installed(k)]
    reachable = set().union(*(archs.buildable_archs(k) for k in kinds)) if kinds else set()
    examples = {"sm80", "sm89"}  # the default (sm89) and the example trt-rtx:sm80,sm89
    assert set(re.findall(r"sm\d{2,3}", text)) <= reachable | examples, command
    for kind in kinds:
        assert archs.arch_help(kind) in text
    if "trt" not in kinds:
        assert "sm90" not in text and "h100" not in text


def test_the_same_refusal_text_in_every_command(tmp_path, capsys, demo_onnx):
    pytest.importorskip("tensorrt_rtx")
    from moec_cli import run_cli

    reason = archs.arch_unsupported_reason("trt-rtx", "sm90")
    runs = {
        "optimize": ["optimize", demo_onnx, "-o", tmp_path / "o.onnx", "--target", "trt-rtx:h100"],
        "compile": ["compile", "-o", tmp_path / "c", "--target", "trt-rtx:h100"],
        "build": ["build", demo_onnx, "-o", tmp_path / "b", "--arch", "h100", "--builder", "trt-rtx"],
    }
    for name, argv in runs.items():
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, (name, err)
    assert not any(tmp_path.iterdir())


def test_repeated_targets_accumulate_or_are_refused():
    assert parse("compile", ["-o", "x", "--target", "trt-rtx:sm80", "--target", "trt-rtx:l4"])["target"] == "trt-rtx:sm80,l4"
    assert parse("compile", ["-o", "x"])["target"] == "trt-rtx:sm89"
    assert parse("build", ["m.onnx", "-o", "x", "--arch", "sm80,l4", "--arch", "sm120"])["archs"] == ("sm80", "l4", "sm120")
    assert parse("build", ["m.onnx", "-o", "x"])["archs"] == ("sm89",)
    with pytest.raises(click.BadParameter, match="one graph for one target"):
        parse("optimize", ["m.onnx", "-o", "x", "--target", "ort", "--target", "trt-rtx:sm89"])
    with pytest.raises(click.BadParameter, match="one kind of target"):
        parse("compile", ["-o", "x", "--target", "ort", "--target", "trt-rtx:sm89"])


def test_compile_builds_every_arch_of_one_target(monkeypatch, tmp_path):
    """trt-rtx:sm80,l4 -> one graph optimized for the first arch, one engine per arch."""
    import moec.compiler.build as build_mod
    from moec.compiler.compile import CompileConfig, _State, check_targets, graph_target, stage_build

    config = CompileConfig(target="trt-rtx:sm80,l4")
    assert [str(t) for t in check_targets(config)] == ["trt-rtx:sm80", "trt-rtx:sm89"]
    assert graph_target(config.target) == "trt-rtx:sm80"
    seen = {}

    class Result:
        manifest = {"trt": {"flavour": "tensorrt-rtx", "version": "x"}}
        engines: dict = {}
        warnings: list = []

    def fake_build(onnx_path, out_dir, cfg):
        seen["archs"] = cfg.archs
        return Result()

    monkeypatch.setattr(build_mod, "build_engine", fake_build)
    stage_build(_State(config=config, work=tmp_path, checkpoint=None, optimized_path=tmp_path / "m.onnx"))
    assert seen["archs"] == ("sm80", "l4")
    for bad, match in (("trt-rtx:sm80,a100", "arch sm80 is listed twice"), ("trt:sm90,sm100", "lower the MoE layers differently")):
        with pytest.raises(Exception, match=match):
            check_targets(CompileConfig(target=bad))


# --- Old spellings: still work for one release, with one note -----------------------------------
@pytest.mark.parametrize("command, old, new, dest, value", [
    ("optimize", ["m.onnx", "--out", "x.onnx"], ["m.onnx", "-o", "x.onnx"], "out_path", Path("x.onnx")),
    ("optimize", ["m.onnx", "-o", "x.onnx", "--report", "r.json"], ["m.onnx", "-o", "x.onnx", "--json-out", "r.json"],
     "report_path", Path("r.json")),
    ("build", ["m.onnx", "--out", "e"], ["m.onnx", "--output", "e"], "out_dir", Path("e")),
    ("bench", ["m.onnx", "--json", "r.json"], ["m.onnx", "--json-out", "r.json"], "json_out", Path("r.json")),
    ("run", ["ckpt", "--prompt-ids", "1", "--dtype", "float16"], ["ckpt", "--prompt-ids", "1", "--dtype", "fp16"],
     "dtype", "fp16"),
    ("build", ["m.onnx", "-o", "e", "--backend", "tensorrt-rtx"], ["m.onnx", "-o", "e", "--builder", "trt-rtx"],
     "builder", "trt-rtx"),
    ("build", ["m.onnx", "-o", "e", "--backend", "tensorrt"], ["m.onnx", "-o", "e", "--builder", "trt"], "builder", "trt"),
])
def test_old_spellings_still_work_with_one_note(capsys, command, old, new, dest, value):
    assert parse(command, new)[dest] == value
    assert "deprecated" not in capsys.readouterr().err
    assert parse(command, old)[dest] == value
    err = capsys.readouterr().err
    assert err.count("deprecated") == 1 and err.startswith("note: ") and len(err.strip().splitlines()) == 1


def test_builder_and_backend_are_two_concepts():
    """--builder (which TensorRT builds engines) takes --target's kind names; --backend (what runs an
    artifact) the runtimes; no visible option names a TensorRT flavour the old way."""
    from moec.compiler.build import BuildConfig  # noqa: F401 - the config whose flavour names build maps to
    from moec.compiler.commands.conventions import BUILDER_FLAVOURS, BUILDERS
    from moec.compiler.commands.run import BACKENDS
    from moec.passes.targets import KINDS
    from moec.runtime.trt_engines import FLAVOUR_MODULES

    assert set(BUILDERS) == set(archs.STATIC_ARCHS) == set(KINDS) - {"ort"}
    assert set(BUILDER_FLAVOURS.values()) == set(FLAVOUR_MODULES)
    seen = {}
    for name, command in COMMANDS.items():
        for option in visible_options(command):
            names = long_names(option)
            if "--builder" in names or "--backend" in names:
                seen.setdefault(names[0], []).append(name)
                choices = tuple(option.type.choices)
                assert not set(choices) & set(FLAVOUR_MODULES), (name, choices)
                assert set(choices) <= (set(BUILDERS) if "--builder" in names else set(BACKENDS)), (name, choices)
    assert {k: sorted(v) for k, v in seen.items()} == {"--builder": ["build"], "--backend": ["bench", "run"]}
    assert parse("build", ["m.onnx", "-o", "e"])["builder"] is None  # whichever imports


@pytest.mark.parametrize("kind, arch", [("trt-rtx", "sm100"), ("trt-rtx", "sm90")])
def test_messages_spell_the_builder_as_build_takes_it(kind, arch):
    reason = archs.arch_unsupported_reason(kind, arch)
    if reason is None or "--builder" not in reason:
        pytest.skip(f"{kind} builds {arch} here")
    value = re.search(r"--builder (\S+?)\)", reason).group(1)
    assert parse("build", ["m.onnx", "-o", "e", "--builder", value])["builder"] == value


def test_old_and_new_spelling_together_or_neither_is_refused():
    with pytest.raises(click.UsageError, match="given twice"):
        parse("optimize", ["m.onnx", "-o", "a.onnx", "--out", "b.onnx"])
    with pytest.raises(click.UsageError, match="given twice"):
        parse("optimize", ["m.onnx", "--out", "b.onnx", "-o", "a.onnx"])
    with pytest.raises(click.MissingParameter):
        parse("build", ["m.onnx"])


# --- README's command table says what --help says ------------------------------------------------
def readme_rows() -> list[str]:
    text = README.read_text()
    table = text[text.index("## Commands"):text.index("**Quantization**")]
    return [line for line in table.splitlines() if line.startswith("| `moec ")]


def test_readme_command_table_matches_help():
    rows = readme_rows()
    usages = [u.replace("\\|", "|") for row in rows for u in re.findall(r"`(moec [^`]+)`", row.split(" | ")[0])]
    assert {u.split()[1] for u in usages} == set(COMMANDS)  # every command is in the table, no other
    for usage in usages:
        name = usage.split()[1]
        options = {n: o for o in visible_options(COMMANDS[name]) for n in long_names(o) + [s for s in o.opts if not s.startswith("--")]}
        for flag, values in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)(?:[ =]([^\s\]\[)]+))?", usage):
            assert flag in options, f"README names {flag} for moec {name}, which --help does not list"
            option = options[flag]
            if isinstance(option.type, click.Choice) and values and "|" in values:
                assert set(values.split("|")) == set(option.type.choices), (name, flag, values)
