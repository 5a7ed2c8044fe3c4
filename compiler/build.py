"""Build stage: an optimized moec ONNX graph -> one TensorRT engine per GPU arch + manifest.json.

One build path over TensorRT's Python API serves full TensorRT (10.x/11.x, builds on the target
GPU) and TensorRT for RTX (builds ahead of time on a CPU for listed compute capabilities); the
module is picked at run time (``BuildConfig.backend``; by default whichever imports, full TensorRT
first) and recorded in the manifest.

Like Polygraphy's loaders, the build is a chain of small steps a user can also call one by one:

    network_from_onnx -> builder_config (profiles, flags, timing cache) -> build_serialized -> save

``build_engine`` runs the chain for every arch and writes the output folder atomically:
``engine.<arch>.plan`` per arch, ``manifest.json`` (hashes, flavour/version, archs, profiles,
precision, plugins, moec version, build time), the sidecar and the tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import importlib
import importlib.metadata
import json
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import onnx

from moec.common import contract
from moec.common.artifacts import atomic_dir, atomic_path, check_output_dir
from moec.common.errors import MoecError
from moec.common.onnx_files import load_graph_structure, require_external_data, require_moec_io
from moec.common.outputs import check_option_output
from moec.common.sidecar import model_tokenizer, read_sidecar
from moec.runtime.bench import source_hashes
from moec.runtime.trt_backend import (
    MANIFEST_FORMAT,
    TrtFlavour,
    engine_problems,
    engine_profiles,
    import_trt,
    load_manifest,
    local_gpu_arch,
    manifest_problems,
    max_prompt_tokens,
    ring_inputs as ring_inputs_of_engine,
    parse_arch,
    read_engine_header,
)

HARDWARE_COMPAT = ("none", "ampere+", "same-cc")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    archs: tuple[str, ...] = ("sm89",)
    backend: str | None = None  # "tensorrt" | "tensorrt-rtx"; None: whichever imports, full TensorRT first
    # trtexec-style profile overrides, one per tensor: "name:1x1,1x128,4x512" (min, opt, max).
    # "prefill:name:..." / "decode:name:..." adjust one of the two default profiles; specs
    # without a prefix build one custom profile instead (see "Profiles" below).
    shapes: tuple[str, ...] = ()
    # Profile limits; None takes them from the sidecar (the export's max_batch and max_positions):
    # a prompt (one prefill step) up to half the positions, decode up to the last position.
    max_batch: int | None = None
    max_new_tokens: int | None = None
    max_past: int | None = None
    # The engine's context (prompt + generated); None: the smaller of the export's positions and
    # moec.compiler.plan.DEFAULT_CONTEXT, since no GPU holds the KV cache of Llama 4's full 10 M.
    max_seq: int | None = None
    # Where TensorRT tunes each profile: prefill at a typical prompt length (capped at
    # max_new_tokens); decode at this batch (None: half of max_batch, since a server's decode batch
    # moves between 1 and the max as requests come and go).
    prefill_opt_tokens: int = 128
    decode_opt_batch: int | None = None
    timing_cache: Path | None = None
    opt_level: int = 3
    hardware_compat: str = "none"  # "none" | "ampere+" | "same-cc"
    version_compatible: bool = False
    workspace_mib: int | None = None
    progress: bool = True

    def __post_init__(self):
        if not self.archs:
            raise MoecError("no GPU arch given: pass --arch, e.g. --arch sm89")
        if not 0 <= self.opt_level <= 5:
            raise MoecError(f"--opt-level {self.opt_level} is out of range: use 0 to 5")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise MoecError(f"--hardware-compat {self.hardware_compat!r}: use one of {', '.join(HARDWARE_COMPAT)}")
        if self.prefill_opt_tokens < 1 or (self.decode_opt_batch is not None and self.decode_opt_batch < 1):
            raise MoecError("prefill_opt_tokens and decode_opt_batch must be at least 1")
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise MoecError(f"--workspace {self.workspace_mib} MiB: give a positive size")
        # None means "from the export"; 0 is not a way to say that, so it is refused, not defaulted.
        for option, value in (("--max-batch", self.max_batch), ("--max-new-tokens", self.max_new_tokens),
                              ("--max-past", self.max_past), ("--max-seq", self.max_seq)):
            if value is not None and value < 1:
                raise MoecError(f"{option} {value}: give at least 1 (or leave it out for the export's default)")
            from moec.compiler.dims import check_dim

            check_dim(option, value)


@dataclasses.dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    engines: dict[str, Path]  # arch -> engine file
    warnings: list[str]
    seconds: float


# --- The TensorRT logger: keep TensorRT's messages so errors can quote them ------------------------
def make_logger(trt):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))

        def mark(self) -> int:
            return len(self.messages)

        def since(self, mark: int, max_severity) -> list[str]:
            # Severity enum: lower is worse (INTERNAL_ERROR 0, ERROR 1, WARNING 2).
            return [m for s, m in self.messages[mark:] if int(s) <= int(max_severity)]

    return _Logger()


def _errors(logger, mark: int, trt) -> str:
    # A CPU-only host logs CUDA probe failures (cudaError 35) on every call; they never explain a
    # build failure, so leave them out of the message.
    msgs = [m for m in logger.since(mark, trt.ILogger.Severity.ERROR) if "cudaError 35" not in m]
    # Myelin dumps whole tensors into its messages; the first 600 characters carry the reason.
    return "\n  ".join(m if len(m) <= 600 else m[:600] + " ..." for m in msgs[-6:]) or "(TensorRT logged no error)"


# --- Step 1: network from ONNX --------------------------------------------------------------------
def network_from_onnx(flavour: TrtFlavour, onnx_path: Path, logger):
    """Parse ``onnx_path`` into a strongly typed network (precision is the graph's own dtypes).
    Returns (builder, network, keep): ``keep`` holds the parser and the memory-mapped weights
    (moec.compiler.build_stream), which the network points into until the build is done."""
    trt = flavour.trt
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    weights = None
    if hasattr(parser, "load_model_proto"):
        from moec.compiler.build_stream import load_external_initializers

        proto = onnx.load(str(onnx_path), load_external_data=False)
        ok = parser.load_model_proto(proto.SerializeToString(), str(onnx_path))
        if ok:
            weights = load_external_initializers(parser, proto, onnx_path)
            ok = parser.parse_model_proto()
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        lines = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            lines.append(f"node {e.node_name() or '#' + str(e.node())} (op {e.node_operator()}): {e.desc()}")
        raise MoecError(
            f"{flavour.name} cannot parse {onnx_path}:\n  " + "\n  ".join(lines)
            + "\nrewrite the graph for this target (moec optimize --target trt:<arch> or trt-rtx:<arch>, "
            "with --moe-lowering hybrid (the default) or dense)"
        )
    return builder, network, (parser, weights)


def check_external_data(onnx_path: Path) -> None:
    """A missing or truncated .data file (or one outside the model's folder), named, before
    TensorRT's parser reports it as an unimportable initializer (which reads like a graph problem)
    or reads whatever file the graph points at."""
    require_external_data(onnx_path)


# --- Profiles --------------------------------------------------------------------------------------
# Two optimization profiles by default, because one profile is tuned at one opt point and the two
# phases of generation run very different shapes:
#   prefill: a whole prompt at once, new_tokens 1..max_new (opt: a typical prompt), past from 0
#            (opt 0) up to max_past capped so new + past fit the positions;
#   decode:  one token per step, new_tokens exactly 1, past 1..max_past (opt: the middle).
# TensorRT numbers profiles in the order they are added; the manifest lists them in that order
# (its "index"), and the runtime picks one per step (moec.runtime.trt_backend.select_profile).
# ``--shapes`` overrides: "prefill:NAME:MIN,OPT,MAX" or "decode:NAME:..." change that tensor in
# that profile only; a spec without a prefix builds ONE custom profile instead (both phases'
# range, opt at decode), the tensors it names overridden. The two forms do not mix.
Shape = tuple[int, ...]
Ranges = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
PROFILE_NAMES = ("prefill", "decode")
CUSTOM_PROFILE = "custom"


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str  # "prefill" | "decode" | "custom"
    shapes: Ranges


@dataclasses.dataclass(frozen=True)
class Limits:
    """The largest shapes the engine accepts, over all its profiles: max_new_tokens bounds one
    step's tokens (a prompt), max_past the past a step reads (decode's, the longest context)."""

    max_batch: int
    max_new_tokens: int
    max_past: int
    max_positions: int


def profile_limits(sidecar: dict[str, Any], config: BuildConfig) -> Limits:
    """Batch, new-token and past-length limits: the config's, else the sidecar's export settings.
    By default a prompt may take half the positions and decode may run up to the last position."""
    model = sidecar.get("model_config", {})
    max_positions = sidecar.get("max_positions") or model.get("max_position_embeddings")
    if not max_positions:
        raise MoecError("the sidecar names no max_positions or model_config.max_position_embeddings: re-export the model")
    max_positions = context_positions(int(max_positions), config.max_seq)
    max_batch = config.max_batch if config.max_batch is not None else int(sidecar.get("max_batch") or 1)
    max_new = config.max_new_tokens if config.max_new_tokens is not None else max(1, max_positions // 2)
    max_past = config.max_past if config.max_past is not None else max_positions - 1
    if max_batch < 1:
        raise MoecError(f"--max-batch {max_batch}: give at least 1")
    if not 1 <= max_new <= max_positions:
        raise MoecError(f"--max-new-tokens {max_new} is outside 1..{max_positions} (the model's positions): lower it")
    if not 1 <= max_past <= max_positions - 1:
        raise MoecError(
            f"--max-past {max_past} is outside 1..{max_positions - 1}: decode reads at least one past token and "
            f"its own token takes a position of the model's {max_positions}; pick a past length in that range"
        )
    return Limits(max_batch, max_new, max_past, max_positions)


def context_positions(export_positions: int, max_seq: int | None) -> int:
    """The engine's context: ``max_seq``, else min(the export's positions, DEFAULT_CONTEXT)."""
    from moec.compiler.plan import DEFAULT_CONTEXT

    if max_seq is None:
        return min(export_positions, DEFAULT_CONTEXT)
    if not 2 <= max_seq <= export_positions:
        raise MoecError(f"--max-seq {max_seq} is outside 2..{export_positions} (the export's positions): "
                        "lower it, or re-export with a larger --max-seq")
    return max_seq


def phase_ranges(limits: Limits, config: BuildConfig) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of the batch, new-token and past axes for each profile the limits give."""
    # A profile is a box: its corner new + past must fit the positions, so a long prompt window
    # leaves less past for prefill (chunked prompts); decode's one token leaves all of it.
    prefill_past = min(limits.max_past, limits.max_positions - limits.max_new_tokens)
    decode_batch = config.decode_opt_batch or max(1, limits.max_batch // 2)
    return {
        "prefill": {"batch": (1, 1, limits.max_batch),
                    "new": (1, min(config.prefill_opt_tokens, limits.max_new_tokens), limits.max_new_tokens),
                    "past": (0, 0, prefill_past),
                    # Image prompts (a graph with image_features): up to every new token an image token.
                    "image_rows": (0, 0, limits.max_new_tokens)},
        "decode": {"batch": (1, min(decode_batch, limits.max_batch), limits.max_batch),
                   "new": (1, 1, 1),
                   "past": (1, max(1, limits.max_past // 2), limits.max_past),
                   "image_rows": (0, 0, 0)},
        # One profile for both phases, tuned for decode (what a single-profile engine spends most
        # steps on); the base of unprefixed --shapes.
        CUSTOM_PROFILE: {"batch": (1, 1, limits.max_batch),
                         "new": (1, 1, limits.max_new_tokens),
                         "past": (0, max(1, prefill_past // 2) if prefill_past else 0, prefill_past),
                         "image_rows": (0, 0, limits.max_new_tokens)},
    }


def axis_roles(name: str, rank: int) -> tuple[str | None, ...]:
    """The moec role of each axis of an input: batch, new (tokens this step), past (cache length)."""
    if name.startswith(("past_key.", "past_value.")):
        return ("batch", None, "past", None)
    if name in (contract.INPUT_IDS, contract.POSITION_IDS):
        return ("batch", "new")
    if name == contract.IMAGE_FEATURES:
        return ("image_rows", None)
    return (None,) * rank


def _tensor_ranges(network, axes: dict[str, tuple[int, int, int]]) -> Ranges:
    """min/opt/max per network input: each dynamic axis from its moec role (batch, new, past)."""
    out: Ranges = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        role = axis_roles(t.name, len(shape))
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(shape):
            if dim >= 0:
                lo.append(dim), opt.append(dim), hi.append(dim)
                continue
            r = role[axis] if axis < len(role) else None
            if r is None:
                raise MoecError(
                    f"input {t.name!r} axis {axis} is dynamic and not a moec batch/new_tokens/past_len axis: "
                    f"give its range with --shapes {t.name}:MINx..,OPTx..,MAXx.."
                )
            lo.append(axes[r][0]), opt.append(axes[r][1]), hi.append(axes[r][2])
        out[t.name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def parse_shapes(specs: tuple[str, ...]) -> dict[str | None, Ranges]:
    """trtexec-style ``[prefill:|decode:]name:1x1,1x128,4x512`` (min, opt, max), several per
    argument split by spaces; keyed by profile name, None for specs without a prefix."""
    out: dict[str | None, Ranges] = {}
    for spec in " ".join(specs).split():
        name, sep, ranges = spec.rpartition(":")
        parts = ranges.split(",")
        if not sep or not name or len(parts) != 3:
            raise MoecError(f"--shapes {spec!r}: write [prefill:|decode:]name:MIN,OPT,MAX with dims joined by x, "
                            "e.g. input_ids:1x1,1x128,4x512")
        prefix, psep, rest = name.partition(":")
        profile = prefix if psep and prefix in PROFILE_NAMES else None
        if profile is not None:
            name = rest
        try:
            dims = tuple(tuple(int(d) for d in p.split("x")) if p else () for p in parts)
        except ValueError:
            raise MoecError(f"--shapes {spec!r}: dims must be integers joined by x") from None
        out.setdefault(profile, {})[name] = dims  # type: ignore[assignment]
    if None in out and len(out) > 1:
        raise MoecError("--shapes mixes specs with a profile prefix (prefill:/decode:) and without one: either prefix "
                        "every spec (adjusting the two default profiles) or none (one custom profile)")
    return out


def apply_overrides(network, ranges: Ranges, overrides: Ranges, profile: str) -> Ranges:
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    merged = dict(ranges)
    where = f"--shapes {profile}:" if profile in PROFILE_NAMES else "--shapes "
    for name, (lo, opt, hi) in overrides.items():
        if name not in inputs:
            hint = f"; profile prefixes are {' and '.join(p + ':' for p in PROFILE_NAMES)}" if ":" in name else ""
            raise MoecError(f"{where}{name} names {name!r}, which is not a network input; inputs are: {', '.join(inputs)}{hint}")
        shape = inputs[name]
        if not len(lo) == len(opt) == len(hi) == len(shape):
            raise MoecError(f"{where}{name}: rank of min/opt/max ({len(lo)}, {len(opt)}, {len(hi)}) must equal the input's rank {len(shape)}")
        roles = axis_roles(name, len(shape))
        for axis, dim in enumerate(shape):
            if not 0 <= lo[axis] <= opt[axis] <= hi[axis]:
                raise MoecError(f"{where}{name}: axis {axis} needs 0 <= min <= opt <= max, got {lo[axis]}, {opt[axis]}, {hi[axis]}")
            # Only a cache may be empty (a prompt's first step has no past); a step has at least
            # one sequence and one token.
            if dim < 0 and lo[axis] < 1 and (roles[axis] if axis < len(roles) else None) not in ("past", "image_rows"):
                what = {"batch": "batch", "new": "new tokens"}.get(roles[axis] if axis < len(roles) else None, "size")
                raise MoecError(f"{where}{name}: axis {axis} ({what}) has min {lo[axis]}; a step needs at least 1: give min >= 1")
            if dim >= 0 and not lo[axis] == opt[axis] == hi[axis] == dim:
                raise MoecError(f"{where}{name}: axis {axis} is fixed at {dim} in the graph, got {lo[axis]}, {opt[axis]}, {hi[axis]}")
        merged[name] = (lo, opt, hi)
    return merged


def build_profiles(network, limits: Limits, config: BuildConfig) -> list[Profile]:
    """The profiles to build, in TensorRT's index order: prefill and decode from the limits with
    any prefixed overrides, or one custom profile when --shapes has unprefixed specs."""
    overrides = parse_shapes(config.shapes)
    axes = phase_ranges(limits, config)
    if None in overrides:
        return [Profile(CUSTOM_PROFILE, apply_overrides(network, _tensor_ranges(network, axes[CUSTOM_PROFILE]),
                                                        overrides[None], CUSTOM_PROFILE))]
    return [Profile(name, apply_overrides(network, _tensor_ranges(network, axes[name]), overrides.get(name, {}), name))
            for name in PROFILE_NAMES]


def check_named_dims(model: onnx.ModelProto, profiles: list[Profile]) -> None:
    """TensorRT requires axes that share a symbolic name in the graph (input_ids and position_ids
    both [batch, new_tokens]) to have the same opt value in a profile (it fails the build with
    "Profile kOPT values are not self-consistent"; unequal min/max it narrows to their overlap);
    say so before the build, naming both tensors."""
    named: dict[str, list[tuple[str, int]]] = {}
    for t in model.graph.input:
        for axis, d in enumerate(t.type.tensor_type.shape.dim):
            if d.HasField("dim_param"):
                named.setdefault(d.dim_param, []).append((t.name, axis))
    for p in profiles:
        for dim, uses in named.items():
            opts = {(n, a): p.shapes[n][1][a] for n, a in uses if n in p.shapes}
            if len(set(opts.values())) > 1:
                (n0, a0), v0 = next(iter(opts.items()))
                (n1, a1), v1 = next((k, v) for k, v in opts.items() if v != v0)
                where = f"{p.name}:" if p.name in PROFILE_NAMES else ""
                raise MoecError(
                    f"profile {p.name}: {n0} axis {a0} and {n1} axis {a1} are both {dim!r} in the graph but get opt "
                    f"{v0} and {v1}; TensorRT needs one opt per named axis: give both the same range "
                    f"(--shapes {where}{n1}:...)"
                )


def limits_of(profiles: list[Profile], positions: int, rings: frozenset[str] = frozenset()) -> Limits:
    """The limits the (possibly overridden) profiles really allow, as the runtime will read them;
    each profile's corner must fit the model's positions. ``rings``: the chunked layers' ring
    inputs, whose slot axis is fixed whatever the past (``sidecar_ring_inputs``)."""
    batch = new = past = 0
    for p in profiles:
        ids = p.shapes[contract.INPUT_IDS][2]
        pasts = [v[2][2] for k, v in p.shapes.items()
                 if (k.startswith("past_key.") or k.startswith("past_value.")) and k not in rings]
        p_max = min(pasts) if pasts else 0
        if ids[1] + p_max > positions:
            raise MoecError(
                f"profile {p.name}: max new_tokens {ids[1]} + max past_len {p_max} exceed the model's {positions} "
                "positions: shrink the ranges in --shapes (or --max-new-tokens / --max-past)"
            )
        batch, new, past = max(batch, ids[0]), max(new, ids[1]), max(past, p_max)
    return Limits(batch, new, past, positions)


def sidecar_ring_inputs(sidecar: dict[str, Any]) -> frozenset[str]:
    """The past inputs of chunked layers' ring caches (fixed slots; their profile range is that
    size in every profile, so the decode past range applies to the full caches only)."""
    from moec.common.kv_cache import cache_layout

    return frozenset(name for c in cache_layout(sidecar) if c.ring
                     for name in (contract.past_key(c.layer), contract.past_value(c.layer)))


def kv_cache_summary(io_inputs: list[dict[str, Any]], limits: Limits) -> dict[str, Any]:
    """KV bytes per sequence at the engine's max context (decode's past + its token), per cache
    kind, from the network's input shapes."""
    from moec.common.kv_cache import kv_bytes_from_io

    context = min(limits.max_positions, limits.max_past + 1)
    return {"context": context, "bytes_per_sequence": kv_bytes_from_io(io_inputs, context)}


# --- Step 2: builder config ------------------------------------------------------------------------
def builder_config(flavour: TrtFlavour, builder, network, arch: str, profiles: list[Profile], config: BuildConfig,
                   timing_cache, logger, notes: list[str]):
    trt = flavour.trt
    cfg = builder.create_builder_config()
    if flavour.is_rtx:
        cc = getattr(trt.ComputeCapability, arch.upper(), None)
        cfg.num_compute_capabilities = 1
        cfg.set_compute_capability(cc, 0)
    cfg.builder_optimization_level = config.opt_level
    # Detailed layer information costs nothing at run time and lets `moec inspect` show every layer.
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if config.workspace_mib is not None:
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    if not flavour.is_rtx:
        if config.hardware_compat != "none":
            level = {"ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}[config.hardware_compat]
            if not hasattr(trt.HardwareCompatibilityLevel, level):
                raise MoecError(f"--hardware-compat {config.hardware_compat}: TensorRT {flavour.version} has no {level}; upgrade TensorRT")
            cfg.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
        if config.version_compatible:
            cfg.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    for profile in profiles:
        tp = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            tp.set_shape(name, lo, opt, hi)
        mark = logger.mark()
        if cfg.add_optimization_profile(tp) < 0:
            raise MoecError(f"{flavour.name} refused the {profile.name} optimization profile: {_errors(logger, mark, trt)}; "
                            "fix --shapes")
    if timing_cache is not None and not isinstance(timing_cache, _KeptTimingCache):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if not cfg.set_timing_cache(timing_cache, False):
                notes.append("the timing cache was made by another device or TensorRT version; TensorRT ignored it")
    return cfg


def check_archs(flavour: TrtFlavour, config: BuildConfig) -> list[str]:
    """Normalize the arch names and refuse the ones the flavour cannot target, saying what to do."""
    from moec.common.archs import check_archs as checked

    # One table and one refusal text for --arch and --target (moec.common.archs): GPU names
    # accepted, an arch listed twice refused, what the flavour offers asked of its module.
    archs = checked("trt-rtx" if flavour.is_rtx else "trt", config.archs)
    if flavour.is_rtx:
        return archs
    local = local_gpu_arch()
    if local is None:
        raise MoecError("full TensorRT builds on the GPU it targets and no CUDA GPU is visible here: "
                        "build on a GPU host, or use --backend tensorrt-rtx for sm75/sm80/sm86/sm89/sm120/sm121")
    for a in archs:
        if config.hardware_compat == "ampere+":
            if parse_arch(a) < (8, 0):
                raise MoecError(f"arch {a}: --hardware-compat ampere+ engines run on sm80 and newer only")
        elif a != local:
            raise MoecError(
                f"arch {a}: full TensorRT builds for the local GPU ({local}); build {a} on a {a} host, or pass "
                f"--hardware-compat ampere+ for one engine that runs on sm80 and newer (slower)"
            )
    return archs


# --- Step 3: the serialized engine, under a progress monitor ---------------------------------------
class ProgressDisplay:
    """rich progress bars, one per TensorRT build phase."""

    def __init__(self, enabled: bool):
        self._progress = None
        self._tasks: dict[str, Any] = {}
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                      TimeElapsedColumn(), transient=True)

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def phase_start(self, parent: str | None, name: str, steps: int) -> None:
        if self._progress is not None:
            depth = 0
            while parent is not None and parent in self._tasks:
                depth += 1
                parent = self._tasks[parent][1]
            self._tasks[name] = (self._progress.add_task("  " * depth + name, total=steps), parent)

    def step(self, name: str, step: int) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.update(self._tasks[name][0], completed=step + 1)

    def phase_finish(self, name: str) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.remove_task(self._tasks.pop(name)[0])


def make_progress_monitor(trt, display: ProgressDisplay, cancel: threading.Event):
    """An IProgressMonitor that drives ``display`` and cancels the build when ``cancel`` is set or a
    display callback raises (Ctrl-C lands there). TensorRT swallows exceptions from the callbacks,
    so the first one is kept and re-raised once the build has returned."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.error: BaseException | None = None

        def _guard(self, fn: Callable[[], None]) -> bool:
            if self.error is not None or cancel.is_set():
                return False
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised after the build returns
                self.error = e
                return False
            return True

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._guard(lambda: display.phase_start(parent_phase, phase_name, num_steps))

        def step_complete(self, phase_name, step):
            return self._guard(lambda: display.step(phase_name, step))

        def phase_finish(self, phase_name):
            self._guard(lambda: display.phase_finish(phase_name))

    return _Monitor()


@contextlib.contextmanager
def _sigint_cancels(cancel: threading.Event):
    """While building, Ctrl-C sets ``cancel`` (the monitor stops TensorRT at its next step)
    instead of raising inside TensorRT's C++ code."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def build_serialized(flavour: TrtFlavour, builder, network, cfg, logger, display: ProgressDisplay, arch: str,
                     out_path: Path) -> tuple[str, int]:
    """Build and write the plan to ``out_path``; (sha256, bytes). Streamed where the builder can
    (build_serialized_network_to_stream: no host copy of the whole plan)."""
    trt = flavour.trt
    cancel = threading.Event()
    monitor = make_progress_monitor(trt, display, cancel)
    cfg.progress_monitor = monitor
    mark = logger.mark()
    writer = None
    with _sigint_cancels(cancel):
        if hasattr(builder, "build_serialized_network_to_stream"):
            from moec.compiler.build_stream import make_plan_writer

            writer = make_plan_writer(trt, out_path)
            try:
                blob = writer if builder.build_serialized_network_to_stream(network, cfg, writer) else None
            finally:
                writer.close()
        else:
            blob = builder.build_serialized_network(network, cfg)
    if monitor.error is not None:
        raise monitor.error
    if cancel.is_set():
        raise KeyboardInterrupt
    if blob is None:
        errors = _errors(logger, mark, trt)
        hint = "check the graph's ops and dtypes for this target (moec optimize --target), or try --opt-level 0"
        if flavour.is_rtx:
            # Observed with TensorRT-RTX 1.7: gather together with the fused RotaryEmbedding fails in
            # Myelin (ssa_validation) at batch > 1, so `moec optimize --target trt-rtx:*` leaves RoPE
            # unfused under gather; a graph optimized for another target can still hit it.
            hint = ("optimize the export for this target (moec optimize --target trt-rtx:<arch>; the default "
                    "lowering is hybrid, dense also builds), or try --opt-level 0")
        raise MoecError(f"{flavour.name} {flavour.version} could not build the engine for {arch}:\n  {errors}\n{hint}")
    if writer is not None:
        return writer.sha256.hexdigest(), writer.bytes
    out_path.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest(), len(blob)


# --- Timing cache ------------------------------------------------------------------------------------
def load_timing_cache(flavour: TrtFlavour, builder, path: Path | None, logger, notes: list[str]):
    """The timing cache to build with: ``path``'s if it loads, a fresh one if missing (created after
    the build) or corrupt (rebuilt, with a warning)."""
    if path is None:
        return None
    trt = flavour.trt
    cfg = builder.create_builder_config()
    data = b""
    if path.is_file():
        data = path.read_bytes()
    else:
        notes.append(f"timing cache {path} does not exist: it will be created")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mark = logger.mark()
        cache = cfg.create_timing_cache(data)
        # TensorRT answers unreadable bytes with an empty cache and a warning, not an error.
        messages = logger.since(mark, trt.ILogger.Severity.WARNING)
    no_gpu = any("cudaError 35" in m for m in messages)
    trouble = [m for m in messages if "cudaError 35" not in m]
    if data and not _timing_cache_header_ok(data) and (no_gpu or cache is None or trouble):
        # Not a cache from another TensorRT (that one is rebuilt below): some other file, which
        # the build would replace with a cache. Refused, never overwritten.
        raise MoecError(f"--timing-cache {path} is not a TensorRT timing cache (TensorRT cannot load it and it "
                        "lacks a timing cache's header); moec does not overwrite it: give a new file name or "
                        "an existing timing cache")
    if data and no_gpu:
        # Without a GPU, TensorRT-RTX cannot load any timing cache, even its own, so it cannot tell
        # a good file from a bad one; fall back to the header it writes (see _timing_cache_header_ok).
        ok = _timing_cache_header_ok(data)
        trouble = [] if ok else ["its header is not a TensorRT timing cache header"]
        if ok:
            # Keep the user's bytes: TensorRT-RTX ignores the cache, and a later GPU build can use them.
            cache = _KeptTimingCache(data)
    if data and (cache is None or trouble):
        notes.append(f"timing cache {path} is corrupt or from another TensorRT ({'; '.join(trouble) or 'unreadable'}): rebuilding it")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cache = cfg.create_timing_cache(b"")
    if flavour.is_rtx:
        notes.append("TensorRT-RTX treats timing caches as no-ops (since 1.2): the file is kept valid for full TensorRT builds")
    return cache


def _timing_cache_header_ok(data: bytes) -> bool:
    """Observed layout of a TensorRT(-RTX 1.7) timing cache: magic b"ptrt", a u32 format number,
    a u64 payload size equal to the file size minus 20. Hand-checked only where TensorRT itself
    cannot load caches (TensorRT-RTX on a host without a GPU)."""
    return len(data) >= 20 and data[:4] == b"ptrt" and int.from_bytes(data[8:16], "little") == len(data) - 20


class _KeptTimingCache:
    """A timing cache TensorRT could not load here, kept byte for byte (see load_timing_cache)."""

    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return self.data


def save_timing_cache(cache, path: Path | None) -> None:
    if cache is None or path is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        data = bytes(cache.serialize())
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# --- What the manifest records ---------------------------------------------------------------------
def plugins_needed(model: onnx.ModelProto) -> list[dict[str, str]]:
    found = {}
    for node in _all_nodes(model.graph):
        if node.op_type == contract.PLUGIN_NAME:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            version = attrs.get("plugin_version", contract.PLUGIN_VERSION)
            namespace = attrs.get("plugin_namespace", node.domain or contract.PLUGIN_NAMESPACE)
            version = version.decode() if isinstance(version, bytes) else str(version)
            namespace = namespace.decode() if isinstance(namespace, bytes) else str(namespace)
            found[(node.op_type, version, namespace)] = {"name": node.op_type, "version": version, "namespace": namespace}
    return list(found.values())


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


_ONNX_DTYPE_NAMES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
                     onnx.TensorProto.FLOAT8E4M3FN: "fp8", onnx.TensorProto.INT8: "int8"}


def graph_precision(model: onnx.ModelProto) -> str:
    """The float dtype holding most weight elements; a strongly typed build keeps it."""
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        name = _ONNX_DTYPE_NAMES.get(t.data_type)
        if name:
            n = 1
            for d in t.dims:
                n *= d
            counts[name] = counts.get(name, 0) + n
    return max(counts, key=counts.get) if counts else "fp32"


def network_io(network) -> dict[str, list[dict[str, Any]]]:
    def desc(t):
        return {"name": t.name, "dtype": str(t.dtype).rsplit(".", 1)[-1].lower(), "shape": list(t.shape)}

    return {"inputs": [desc(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [desc(network.get_output(i)) for i in range(network.num_outputs)]}


def network_layers(network) -> dict[str, Any]:
    by_type: dict[str, int] = {}
    for i in range(network.num_layers):
        kind = str(network.get_layer(i).type).rsplit(".", 1)[-1]
        by_type[kind] = by_type.get(kind, 0) + 1
    return {"count": network.num_layers, "by_type": dict(sorted(by_type.items()))}


def _moec_version() -> str:
    try:
        return importlib.metadata.version("moec")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _profiles_json(profiles: list[Profile]) -> list[dict[str, Any]]:
    """The manifest's record, in TensorRT's profile index order (the runtime selects by index)."""
    return [{"name": p.name, "index": i,
             "shapes": {n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in p.shapes.items()}}
            for i, p in enumerate(profiles)]


def engine_file_name(arch: str) -> str:
    return f"engine.{arch}.plan"


# --- The whole stage -------------------------------------------------------------------------------
def build_engine(onnx_path: str | Path, out_dir: str | Path, config: BuildConfig = BuildConfig(),
                 display: ProgressDisplay | None = None) -> BuildResult:
    """Build one engine per arch in ``config.archs`` from ``onnx_path`` into ``out_dir`` (atomically)."""
    t0 = time.perf_counter()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise MoecError(f"{onnx_path} does not exist: pass the .onnx written by `moec optimize` or `moec export`")
    # The output folder is replaced as a whole: refuse one that holds the inputs or something that
    # is not an earlier engine folder, before any work.
    protected = [onnx_path, *([config.timing_cache] if config.timing_cache else [])]
    check_output_dir(out_dir, command="build", inputs=protected)
    if config.timing_cache is not None:
        from moec.compiler.pipeline import model_files

        # Whether it holds a timing cache is load_timing_cache's check; here: not a file of the model.
        check_option_output(config.timing_cache, "--timing-cache", kind="timing cache", is_kind=lambda p: True,
                            inputs=model_files(onnx_path))
    flavour = import_trt(config.backend)
    trt = flavour.trt
    notes: list[str] = []
    archs = check_archs(flavour, config)
    if flavour.is_rtx:
        if config.version_compatible:
            raise MoecError("--version-compatible does not apply to TensorRT-RTX (it cannot build lean-runtime engines): "
                            "drop the flag, or build with --backend tensorrt")
        if config.hardware_compat != "none":
            # Like --version-compatible: an option with no effect is refused, never recorded as if it applied.
            raise MoecError(f"--hardware-compat {config.hardware_compat} does not apply to TensorRT-RTX: each engine runs "
                            "on the compute capability it was built for; list the archs with --arch instead, or build "
                            "with --backend tensorrt")
    sidecar = read_sidecar(onnx_path)
    tokenizer = model_tokenizer(onnx_path.parent, sidecar, onnx_path)  # shipped in the engine folder
    from moec.compiler.quantize_stage import check_engine_archs

    check_engine_archs(sidecar, archs, onnx_path)
    check_external_data(onnx_path)
    model = load_graph_structure(onnx_path)
    require_moec_io(onnx_path, model, sidecar["num_layers"], "image_token_id" in sidecar)
    source = source_hashes(onnx_path)
    plugins = plugins_needed(model)
    if plugins:
        _register_moec_plugin(flavour, notes)

    logger = make_logger(trt)
    builder, network, _parser = network_from_onnx(flavour, onnx_path, logger)
    limits = profile_limits(sidecar, config)
    profiles = build_profiles(network, limits, config)
    check_named_dims(model, profiles)
    limits = limits_of(profiles, limits.max_positions, sidecar_ring_inputs(sidecar))
    try:
        memory, context_note = _engine_memory(sidecar, model, limits, config)
    except MoecError as e:  # a graph from another exporter: no Llama 4 config to plan from
        memory, context_note = None, ""
        notes.append(f"no memory plan: {e}")
    timing_cache = load_timing_cache(flavour, builder, config.timing_cache, logger, notes)

    display = display or ProgressDisplay(config.progress)
    engines: dict[str, Path] = {}
    with atomic_dir(out_dir, command="build", inputs=protected) as tmp:
        entries = []
        with display:
            # With ampere+, one full-TensorRT build serves every listed arch.
            groups = [archs] if (not flavour.is_rtx and config.hardware_compat == "ampere+") else [[a] for a in archs]
            for group in groups:
                cfg = builder_config(flavour, builder, network, group[0], profiles, config, timing_cache, logger, notes)
                name = engine_file_name(group[0] if len(group) == 1 else "ampere_plus")
                sha, size = build_serialized(flavour, builder, network, cfg, logger, display, ",".join(group), tmp / name)
                entries.append({"file": name, "archs": group, "sha256": sha, "bytes": size})
                for a in group:
                    engines[a] = out_dir / name
        from moec.compiler.build_vision import build_vision_engines

        with display:
            vision = build_vision_engines(flavour, onnx_path, tmp, archs, logger, display, config)
        sidecar_file = contract.sidecar_path(onnx_path)
        shutil.copy2(sidecar_file, tmp / sidecar_file.name)
        if tokenizer is not None:
            shutil.copy2(tokenizer, tmp / contract.TOKENIZER_FILE)
        manifest = {
            "format": MANIFEST_FORMAT,
            "moec_version": _moec_version(),
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - t0, 3),
            "trt": {"flavour": flavour.name, "module": trt.__name__, "version": flavour.version},
            "source_onnx": source,
            "archs": archs,
            "engines": entries,
            "profiles": _profiles_json(profiles),
            "limits": dataclasses.asdict(limits),
            "context_note": context_note,
            "memory": memory,
            "precision": graph_precision(model),
            "quantization": sidecar.get("quantization"),  # format, group, scope, calibration (moec optimize)
            "strongly_typed": True,
            "plugins": plugins,
            "io": network_io(network),
            "kv_cache": kv_cache_summary(network_io(network)["inputs"], limits),
            "network_layers": network_layers(network),
            "build_options": {"opt_level": config.opt_level, "hardware_compat": config.hardware_compat,
                              "version_compatible": config.version_compatible, "workspace_mib": config.workspace_mib},
            "sidecar": sidecar_file.name,
            "tokenizer": contract.TOKENIZER_FILE if tokenizer is not None else None,
            "notes": notes,
        }
        if vision is not None:
            manifest["vision"] = vision  # the vision graph's engines (compiler/build_vision.py)
        (tmp / contract.ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Inside the folder's transaction: a cache that cannot be written fails the build before
        # the engine folder appears, not after.
        save_timing_cache(timing_cache, config.timing_cache)
    return BuildResult(out_dir, manifest, engines, notes, time.perf_counter() - t0)


def _engine_memory(sidecar: dict[str, Any], model: onnx.ModelProto, limits: Limits,
                   config: BuildConfig) -> tuple[dict[str, Any], str]:
    """moec plan's numbers for this engine (weights as built, KV and activations at its limits),
    and the sentence that says where the context came from when it was the default."""
    from moec.compiler.plan import DEFAULT_CONTEXT, engine_memory
    from moec.compiler.plan import onnx_weight_bytes
    from moec.models.config import Llama4Config

    cfg = Llama4Config.from_hf_dict(sidecar["model_config"], source="the sidecar's model_config")
    ring = any(e.get("kind") == "chunked" for e in sidecar.get("kv_cache") or [])
    memory = engine_memory(cfg, onnx_weight_bytes(model), graph_precision(model), limits.max_batch,
                           limits.max_new_tokens, limits.max_positions, ring)
    exported = int(sidecar.get("max_positions") or cfg.max_position_embeddings)
    note = ""
    if config.max_seq is None and exported > DEFAULT_CONTEXT:
        note = f" (default: min of the export's {exported} and {DEFAULT_CONTEXT}; --max-seq to change)"
    return memory, note


def _register_moec_plugin(flavour: TrtFlavour, notes: list[str]) -> None:
    """Make moec's MoE plugin known to TensorRT's registry, so the parser can resolve the node.
    moec.runtime.trt_plugin raises a MoecError where the flavour cannot host it."""
    try:
        module = importlib.import_module("moec.runtime.trt_plugin")
    except ImportError as e:
        notes.append(f"moec.runtime.trt_plugin is not importable ({e}); the parser will look the plugin up as registered")
        return
    module.register_plugin(flavour.trt)


# --- Inspection ------------------------------------------------------------------------------------
def inspect_engine_dir(engine_dir: str | Path, flavour: str | None = None) -> dict[str, Any]:
    """The manifest, and per engine its I/O tensors and layers from TensorRT's engine inspector.

    Without a usable GPU, TensorRT (both flavours) cannot deserialize an engine, so the inspector is
    out of reach; then each engine shows its header (flavour, version, target archs) and the
    manifest's record of the network's I/O and layers, and ``engines[i]["deserialized"]`` is False
    with the reason.
    """
    engine_dir = Path(engine_dir)
    manifest = load_manifest(engine_dir)
    report: dict[str, Any] = {"manifest": manifest, "engines": []}
    arch = local_gpu_arch()
    trt_flavour = None
    with contextlib.suppress(MoecError):
        trt_flavour = import_trt(flavour or manifest["trt"]["flavour"])
    report["problems"] = manifest_problems(manifest, engine_dir)
    for entry in manifest["engines"]:
        path = engine_dir / entry["file"]
        if not path.is_file():
            raise MoecError(f"{path} is missing: the engine directory is incomplete; rebuild it with `moec build`")
        problems = engine_problems(manifest, engine_dir, entry)
        item: dict[str, Any] = {"file": entry["file"], "archs": entry["archs"], "header": read_engine_header(path),
                                "sha256_ok": not any("sha256" in p for p in problems), "problems": problems,
                                "deserialized": False}
        report["problems"] += problems
        if not item["sha256_ok"]:
            item["reason"] = "the engine file does not match the manifest's sha256 (modified or corrupted): rebuild it"
        elif problems:
            item["reason"] = "the engine header disagrees with the manifest: rebuild it"
        elif trt_flavour is None:
            item["reason"] = f"{manifest['trt']['flavour']} is not importable here"
        elif arch is None:
            item["reason"] = "no CUDA GPU here: TensorRT cannot deserialize engines without one"
        elif arch not in entry["archs"]:
            item["reason"] = f"this GPU is {arch}; the engine targets {', '.join(entry['archs'])}"
        else:
            item.update(_inspect_with_trt(trt_flavour, path))
        report["engines"].append(item)
    report["max_prompt_tokens"] = max_prompt_tokens(engine_profiles(manifest), manifest["limits"]["max_positions"],
                                                    rings=ring_inputs_of_engine(manifest))
    return report


def _inspect_with_trt(flavour: TrtFlavour, path: Path) -> dict[str, Any]:
    trt = flavour.trt
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        return {"reason": f"{flavour.name} could not deserialize it: {_errors(logger, 0, trt)}"}
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io.append({"name": name, "mode": str(engine.get_tensor_mode(name)).rsplit(".", 1)[-1].lower(),
                   "dtype": str(engine.get_tensor_dtype(name)).rsplit(".", 1)[-1].lower(),
                   "shape": list(engine.get_tensor_shape(name))})
    inspector = engine.create_engine_inspector()
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return {"deserialized": True, "io": io, "num_profiles": engine.num_optimization_profiles,
            "layers": layers.get("Layers", layers)}
