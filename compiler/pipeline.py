"""The optimize stage: one flat, phased list of graph passes over an exported ONNX model.

    cleanup    constant folding, dead nodes, identities, shape-op simplification (libraries)
    fusion     rms_norm -> rotary -> qk_norm (ort) -> attention (ort) -> moe_gating -> grouped_experts
    precision  fp32 -> fp16/bf16, routing kept in fp32            (empty unless asked)
    partition  one rank's share of a tp x ep split              (empty unless asked; compiler/partition.py)
    quantize   weights -> int4/int8/fp8/nvfp4 DequantizeLinear, routing never (empty unless asked; compiler/quantize_stage.py)
    lowering   moec ops -> what the target runs (ort, gather, dense, trt-native, trt-plugin);
               ort: Attention over the KV cache -> com.microsoft.GroupQueryAttention
    cleanup    again, for what the rewrites left; then onnx shape inference types every value

Precision runs on the fused graph, before lowering: there the routing is one op
(moec.MoEGating) whose fp32 contract is explicit, and every lowering then emits its ops in the
dtypes it finds. A disabled step is an empty step, not a branch.

The model is loaded once with onnx-ir, lazily: external weights stay in their file (memory-mapped)
until the output is written, and relaid weights are computed only while writing. The output
(.onnx, .onnx.data when the input had external data, the sidecar, tokenizer.json) is written under
temporary names and renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from moec.common import contract, progress
from moec.common.artifacts import atomic_file_set, write_json_atomic
from moec.common.errors import MoecError
from moec.common.outputs import check_output_folder_option, mark_output_folder
from moec.common.resources import as_resource_error
from moec.common.sidecar import check_tokenizer_slot, model_tokenizer, read_sidecar

PRECISIONS = ("fp32", "fp16", "bf16")
PHASES = ("cleanup", "fusion", "precision", "partition", "quantize", "lowering", "cleanup")
# Inputs without external data are written inline up to this size (protobuf's limit is 2 GiB).
INLINE_WEIGHT_LIMIT_BYTES = 1 << 30
# --dump-dir writes the graph only: initializers above this size become typed graph inputs.
DUMP_INLINE_LIMIT_BYTES = 1024
# The marker a dump folder carries: a later --dump-dir may write into it again (common/outputs.py).
DUMP_COMMAND = "optimize --dump-dir"


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    """How to optimize; ``moec optimize`` fills it, defaults live here only."""

    target: str = "ort"  # "ort" | "trt:<arch>" | "trt-rtx:<arch>"
    moe_lowering: str | None = None  # None/"auto": the target's fastest valid lowering
    precision: str | None = None  # None: keep the export's dtype; "fp16"/"bf16" from an fp32 export
    dump_dir: str | os.PathLike | None = None  # write the graph (not the weights) after every phase
    require_fusion: bool = False  # 0 fused MoE layers is an error instead of a warning
    fuse_rms_norm: bool | None = None  # None: where the target takes opset 23 (ort, trt-rtx)
    fuse_rotary: bool | None = None  # RoPE -> RotaryEmbedding; None: as fuse_rms_norm
    fuse_attention: bool | None = None  # -> ONNX Attention; None: ort only (passes/fusions/attention.py says why)
    fuse_qk_norm: bool | None = None  # weightless QK norm -> RMSNormalization; None: ort only (passes/fusions/qk_norm.py)
    fuse_gqa: bool | None = None  # Attention + KV cache -> com.microsoft.GroupQueryAttention; None: ort, one rank (passes/lowerings/ort_gqa.py)
    cleanup_iterations: int = 2  # a clean-up pass repeats while it still changes the graph
    # Weight quantization (passes/quantize); the routing always stays in full precision.
    quantize: str | None = None  # None | "int4" | "int8" | "fp8" | "nvfp4"
    quantize_group: int | None = None  # int4's block along K: 32 | 64 | 128; None: 128
    quantize_scope: str = "experts"  # "experts" | "mlp" (+ shared expert, dense MLPs) | "all" (+ attention)
    quantize_symmetric: bool = True  # int4 only: False stores a zero point per block
    # int4: "rtn" | "clip" (per-block clipping search) | "awq" (calibrated scales + clip) | "gptq" (calibrated
    # error-feedback rounding) | "awq-gptq" (awq's scales, then gptq)
    quantize_method: str = "rtn"
    # fp8: "none" (weight-only) | "static" (calibrated per-tensor E4M3, W8A8) | "static-no-down" (down_proj inputs float)
    quantize_activations: str = "none"
    quantize_calibration: str | None = None  # prompt text for the calibrated ones; None: passes/quantize/calibration.txt


@dataclasses.dataclass
class PassRecord:
    phase: str
    name: str
    matches: int
    ms: float


@dataclasses.dataclass
class OptimizeReport:
    in_path: str
    out_path: str
    target: str
    moe_lowering: dict[str, int]
    precision: str
    passes: list[PassRecord]
    refusals: list[str]
    fused_gating: int
    fused_experts: int
    moe_layers: int | None
    warnings: list[str]
    total_ms: float
    vision: dict | None = None  # the vision graph's passes, when one was optimized too (compiler/vision_optimize.py)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Step:
    phase: str
    name: str
    run: Callable[[ir.Model, "_Context"], int]
    repeat: bool = False  # run again while it still reports matches (at most cleanup_iterations)


@dataclasses.dataclass
class _Context:
    config: OptimizeConfig
    target: object
    log: object
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    lowered: dict[str, int] = dataclasses.field(default_factory=dict)
    calibration: object = None  # passes/quantize/calibrate.Calibration where the quantization calibrates
    sidecar: dict | None = None  # the input's moec metadata, for passes that need what the graph does not say
    gqa_layers: list[int] = dataclasses.field(default_factory=list)  # layers fuse_ort_gqa rewrote


def _cleanup_steps() -> list[Step]:
    from moec.passes import cleanup

    return [Step("cleanup", p.__name__, lambda m, c, p=p: p(m), repeat=True) for p in cleanup.CLEANUP_PASSES]


def _fusion_steps(config: OptimizeConfig, target) -> list[Step]:
    from moec.passes.fusions.attention import fuse_attention
    from moec.passes.fusions.grouped_experts import fuse_grouped_experts
    from moec.passes.fusions.moe_gating import fuse_moe_gating
    from moec.passes.fusions.qk_norm import fuse_qk_norm
    from moec.passes.fusions.rms_norm import fuse_rms_norm
    from moec.passes.fusions.rotary import fuse_rotary
    from moec.passes.targets import lowerings_for

    def counted(key, fn):
        def run(m, c):
            n = fn(m, c.log)
            c.counts[key] = c.counts.get(key, 0) + n
            return n
        return run

    # Opset 23 / RMSNormalization: ONNX Runtime 1.32 runs it and TensorRT-RTX 1.7 parses and builds
    # it (both checked here); full TensorRT's parser could not be checked (not installable), so off.
    # RotaryEmbedding (opset 23, interleaved): the same two runtimes, same checks (tests/passes/test_rotary.py).
    opset23 = target.kind in ("ort", "trt-rtx")
    rms = config.fuse_rms_norm if config.fuse_rms_norm is not None else opset23
    # TensorRT-RTX 1.7.1 cannot build RotaryEmbedding together with the lone gather lowering once a
    # profile allows batch > 1: Myelin "CHECK(graph().ssa_validation()) failed" (demo export, sm89;
    # the same graph with the export's RoPE ops, and hybrid or dense with RotaryEmbedding, build).
    # So gather on trt-rtx keeps the RoPE ops.
    gather_on_rtx = target.kind == "trt-rtx" and lowerings_for(target, config.moe_lowering) == ("gather",)
    rope = config.fuse_rotary if config.fuse_rotary is not None else opset23 and not gather_on_rtx
    # ONNX Attention pays on ONNX Runtime (decode about 3x); TensorRT-RTX cannot build it for sm89 in
    # the demo graph (fp32 or fp16) and TensorRT has its own attention fusion.
    attn = config.fuse_attention if config.fuse_attention is not None else target.kind == "ort"
    # One RMSNormalization per q/k instead of six nodes: faster on ONNX Runtime's CPU provider
    # (passes/fusions/qk_norm.py); TensorRT not checked.
    qk = config.fuse_qk_norm if config.fuse_qk_norm is not None else target.kind == "ort"
    # The opset-23 fusions first: their opset upgrade (onnxscript's version converter) inlines
    # model-local functions, which would dissolve fused moec ops.
    return [
        *([Step("fusion", "fuse_rms_norm", counted("rms_norm", fuse_rms_norm))] if rms else []),
        *([Step("fusion", "fuse_rotary", counted("rotary", fuse_rotary))] if rope else []),
        *([Step("fusion", "fuse_qk_norm", counted("qk_norm", fuse_qk_norm))] if qk else []),
        *([Step("fusion", "fuse_attention", counted("attention", fuse_attention))] if attn else []),
        Step("fusion", "fuse_moe_gating", counted("gating", fuse_moe_gating)),
        Step("fusion", "fuse_grouped_experts", counted("experts", fuse_grouped_experts)),
    ]


def _precision_steps(config: OptimizeConfig) -> list[Step]:
    if config.precision in (None, "fp32"):
        return []
    from moec.passes.precision import convert_precision

    return [Step("precision", f"convert_to_{config.precision}", lambda m, c: convert_precision(m, config.precision))]


def _quantize_steps(config: OptimizeConfig, target) -> list[Step]:
    from moec.compiler.quantize_stage import quantize_steps

    return quantize_steps(config, target)


def _lowering_steps(config: OptimizeConfig, target, partitioned: bool = False) -> list[Step]:
    from moec.passes.lowerings import lower_moe
    from moec.passes.lowerings.ort_gqa import GqaLayout, fuse_ort_gqa
    from moec.passes.targets import lowerings_for

    order = lowerings_for(target, config.moe_lowering)
    by_default = config.moe_lowering in (None, "auto")
    if partitioned and by_default:
        # Rank graphs keep the default before split: split is checked on single graphs only.
        order = tuple(name for name in order if name != "split")

    def run(m, c):
        c.lowered = lower_moe(m, order, str(target), c.log, by_default=by_default)
        return sum(c.lowered.values())

    def gqa(m, c):
        c.gqa_layers = fuse_ort_gqa(m, GqaLayout.from_sidecar(c.sidecar), c.log)
        return len(c.gqa_layers)

    # GroupQueryAttention updates a ring in place and drops the mask (passes/lowerings/ort_gqa.py): ONNX
    # Runtime only, and not on tensor/expert-parallel rank graphs (their runtime binds the cache itself).
    fuse_gqa = config.fuse_gqa if config.fuse_gqa is not None else target.kind == "ort" and not partitioned
    return [Step("lowering", "lower_moe", run), *([Step("lowering", "fuse_ort_gqa", gqa)] if fuse_gqa else [])]


def _typing_step() -> Step:
    from moec.passes.cleanup import infer_types

    return Step("cleanup", "infer_types", lambda m, c: infer_types(m))


def build_pipeline(config: OptimizeConfig, target, partition: Step | None = None) -> list[Step]:
    """The flat pass list, phase by phase (see the module docstring)."""
    from moec.compiler.quantize_stage import checkpoint_fp8_steps

    fold_fp8, restore_fp8 = checkpoint_fp8_steps()
    return [
        fold_fp8,
        *_cleanup_steps(),
        *_fusion_steps(config, target),
        *_precision_steps(config),
        *([partition] if partition is not None else []),
        *_quantize_steps(config, target),
        restore_fp8,
        *_lowering_steps(config, target, partitioned=partition is not None),
        *_cleanup_steps(),
        _typing_step(),
    ]


def run_passes(model: ir.Model, steps: list[Step], ctx: _Context, dump_dir: Path | None = None) -> list[PassRecord]:
    """Run ``steps`` in order; time them, count matches, repeat where asked, name the pass that
    failed, and dump the graph after each phase when ``dump_dir`` is given."""
    records: list[PassRecord] = []
    for i, step in enumerate(steps):
        progress.step(f"{step.phase}: {step.name} ({i + 1}/{len(steps)})")
        t0 = time.perf_counter()
        total = 0
        for _ in range(max(1, ctx.config.cleanup_iterations) if step.repeat else 1):
            try:
                n = step.run(model, ctx)
            except MoecError as e:
                raise MoecError(f"pass {step.name} ({step.phase}): {e}") from e
            except Exception as e:  # a bug in moec: keep the traceback, but say which pass
                if (err := as_resource_error(e, f"pass {step.name} ({step.phase})")) is not None:
                    raise err from None  # out of memory is the machine's limit, not a bug
                raise RuntimeError(f"moec pass {step.name} ({step.phase}) failed: {e}") from e
            total += n
            if not n:
                break
        records.append(PassRecord(step.phase, step.name, total, (time.perf_counter() - t0) * 1e3))
        last_of_phase = i + 1 == len(steps) or steps[i + 1].phase != step.phase
        if dump_dir is not None and last_of_phase:
            _dump(model, dump_dir, f"{_phase_index(records):02d}_{step.phase}")
    return records


def _phase_index(records: list[PassRecord]) -> int:
    index, prev = 0, None
    for r in records:
        if r.phase != prev:
            index, prev = index + 1, r.phase
    return index


def _dump(model: ir.Model, dump_dir: Path, stem: str) -> None:
    """Write the graph only: every initializer over DUMP_INLINE_LIMIT_BYTES becomes a graph input
    with its name, dtype and shape (Netron and onnx shape inference still see it); small constants
    (shapes, scalars, the mask fill) are written inline, also when the input kept them in external
    data, so a dump never references a file beside it.

    Why graph-only and not weights as shared external data: a dump is for reading what a phase did
    to the graph, and the weights do not change between phases except by relayout, which is
    computed lazily while the final output is written. Writing them at every phase would read an
    external checkpoint (and compute every relaid or converted weight) once per phase and cost the
    model's size per dump (a Maverick export is hundreds of GB); sharing one data file would still
    have to write the new tensors and tie the dumps to the input's data file by relative path. The
    weights are not read at all here: the temporarily detached values are put back as they were,
    as onnx-ir's own shape-inference helper does.
    """
    dump_dir.mkdir(parents=True, exist_ok=True)
    graph = model.graph
    big = [v for v in graph.initializers.values() if v not in graph.inputs
           and (v.const_value is None or v.const_value.nbytes > DUMP_INLINE_LIMIT_BYTES)]
    # A small tensor kept in external data is read (a few bytes) and written inline: left as is, the
    # dump would reference a .data file that is not beside it.
    small_external = [v for v in graph.initializers.values() if v not in big
                      and isinstance(v.const_value, ir.ExternalTensor)]
    saved = {v.name: v.const_value for v in big + small_external}
    n_inputs = len(graph.inputs)
    try:
        for v in small_external:
            v.const_value = ir.Tensor(v.const_value.numpy(), name=v.name)
        for v in big:
            if v.const_value is not None:
                v.shape = v.shape or v.const_value.shape
                v.dtype = v.dtype or v.const_value.dtype
            graph.inputs.append(v)
            graph.initializers.pop(v.name)
            v.const_value = None
        _save(model, dump_dir / f"{stem}.onnx", external=False)
    finally:
        while len(graph.inputs) > n_inputs:
            graph.inputs.pop()
        for v in small_external:
            v.const_value = saved[v.name]
        for v in big:
            v.const_value = saved[v.name]
            if v.const_value is not None:
                graph.register_initializer(v)
            else:
                graph.initializers.add(v)


def _has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _save(model: ir.Model, path: Path, external: bool) -> None:
    """Write ``path`` (+ ``path.data``) atomically: into a temporary folder beside it, then renamed."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise MoecError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from None
    try:
        data_name = path.name + ".data"
        ir.save(model, tmp / path.name, external_data=data_name if external else None)
        if external:
            os.replace(tmp / data_name, path.parent / data_name)
        elif (path.parent / data_name).exists():
            (path.parent / data_name).unlink()  # a stale data file from an earlier external write
        os.replace(tmp / path.name, path)
    except OSError as e:
        if (err := as_resource_error(e, f"writing {path}")) is not None:
            raise err from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | os.PathLike) -> None:
    """MoecError unless a file can be created at ``path``, found before any work.

    Probes the nearest existing folder above ``path`` with a temporary file (the only sure test:
    permission bits say nothing to root, nor about read-only or pseudo file systems) and creates
    no folder, so a refused job leaves nothing behind.
    """
    path = Path(path)
    if path.is_symlink():
        raise MoecError(f"{path} is a symbolic link; moec would replace the link, not write through it: "
                        f"give the real path ({path.resolve()}) or a new name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MoecError(f"cannot write {path}: {parent} is a file, not a folder; choose a writable location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moec-probe.", dir=parent)
    except OSError as e:
        raise MoecError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from e
    os.close(fd)
    os.unlink(probe)


def model_files(onnx_path: str | os.PathLike) -> list[Path]:
    """The files a moec ONNX model is made of: the graph, its external data, sidecar and tokenizer."""
    onnx_path = Path(onnx_path)
    return [onnx_path, onnx_path.with_name(onnx_path.name + ".data"), contract.sidecar_path(onnx_path),
            onnx_path.parent / contract.TOKENIZER_FILE]


def _check_external_data(in_path: Path) -> None:
    """The check run and bench make, here before any pass: the output is written by reading every
    weight, so a missing or short .data file would otherwise fail only at the very end. An empty,
    truncated or non-ONNX file, and external data outside the model's folder, are refused here too."""
    from moec.common.onnx_files import require_external_data

    require_external_data(in_path)


_LOWERED_NODE = re.compile(r"moe_(?:%s)_\d+/" % "|".join(re.escape(name) for name in ("ort", "hybrid", "gather", "dense", "trt-native", "trt-plugin", "function")))


def _check_not_optimized_for_another_target(in_path: Path, model: ir.Model, sidecar: dict | None, target) -> bool:
    """True when ``in_path`` was already optimized for ``target`` (running again is a no-op);
    MoecError when it was optimized for another one: its MoE layers are lowered for that target
    and nothing is left to re-fuse, so the result would be the old target's graph labelled as the new."""
    done_for = (sidecar or {}).get("target")
    redo = f"optimize the export (the model.onnx `moec export` wrote) for {target} instead"
    if done_for is not None:
        if done_for == str(target):
            return True
        lowering = sidecar.get("moe_lowering", "?")
        raise MoecError(f"{in_path} is already optimized for {done_for} ({lowering}); {redo}")
    lowered = sorted({m.group(0)[:-1] for n in model.graph.all_nodes() if (m := _LOWERED_NODE.match(n.name or ""))})
    if lowered:
        raise MoecError(f"{in_path} is already optimized (its graph has lowered MoE layers: {', '.join(lowered[:3])}); {redo}")
    return False


def optimize_onnx(in_path: str | os.PathLike, out_path: str | os.PathLike, config: OptimizeConfig = OptimizeConfig()) -> OptimizeReport:
    """Optimize ``in_path`` for ``config.target`` and write ``out_path`` with its sidecar files."""
    from moec.passes.fusions._graph import FusionLog
    from moec.passes.targets import lowerings_for, parse_target

    t_start = time.perf_counter()
    in_path, out_path = Path(in_path), Path(out_path)
    target = parse_target(config.target)
    lowerings_for(target, config.moe_lowering)  # a lowering the target cannot run fails before any work
    if config.precision is not None and config.precision not in PRECISIONS:
        raise MoecError(f"precision {config.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not in_path.is_file():
        raise MoecError(f"{in_path}: no such ONNX file; export one with `moec export`")
    from moec.compiler import vision_optimize

    if vision_optimize.is_vision_graph(in_path):
        return vision_optimize.optimize_vision_onnx(in_path, out_path, config)
    _check_external_data(in_path)
    check_writable(out_path)
    if config.dump_dir is not None:
        check_output_folder_option(config.dump_dir, "--dump-dir", DUMP_COMMAND, inputs=model_files(in_path))
        check_writable(Path(config.dump_dir) / "00_input.onnx")
    from moec.compiler.quantize_stage import check_quantize_request

    quant = check_quantize_request(config, target)  # before any work
    sidecar = read_sidecar(in_path, required=False)
    from moec.compiler.quantize_stage import check_checkpoint_fp8

    check_checkpoint_fp8(sidecar, quant, target, in_path)
    # Copied into the output: only the model's own tokenizer, from inside its folder.
    tok_src = model_tokenizer(in_path.parent, sidecar, in_path)
    if tok_src is not None:
        # The output folder may hold another model's tokenizer.json (one fixed name per folder).
        check_tokenizer_slot(tok_src, out_path.parent / contract.TOKENIZER_FILE)
    if config.precision not in (None, "fp32") and sidecar is not None and sidecar.get("dtype", "fp32") != "fp32":
        raise MoecError(
            f"{in_path} was exported as {sidecar['dtype']}; --precision converts fp32 exports only "
            "(export with --dtype fp32, or drop --precision)"
        )
    try:
        model = ir.load(in_path)
    except Exception as e:
        raise MoecError(f"{in_path}: not a readable ONNX model ({e})") from e
    already = _check_not_optimized_for_another_target(in_path, model, sidecar, target)
    from moec.runtime.vision import vision_onnx_path

    # A vision graph beside the text graph is optimized with it, into the same file set (checked before any work).
    vision_in = vision_onnx_path(in_path)
    vision_plan = vision_optimize.check_vision_graph(vision_in, config, target, (sidecar or {}).get("dtype")) \
        if vision_in.is_file() else None
    external = _has_external_data(model) or _weight_bytes(model) > INLINE_WEIGHT_LIMIT_BYTES

    ctx = _Context(config, target, FusionLog(), sidecar=sidecar)
    from moec.compiler.quantize_stage import calibrate_request

    ctx.calibration = calibrate_request(quant, in_path, tok_src)
    steps = build_pipeline(config, target)
    dump_dir = Path(config.dump_dir) if config.dump_dir is not None else None
    if dump_dir is not None:
        mark_output_folder(dump_dir, DUMP_COMMAND)
        _dump(model, dump_dir, "00_input")
    records = run_passes(model, steps, ctx, dump_dir)

    gating, experts = ctx.counts.get("gating", 0), ctx.counts.get("experts", 0)
    moe_layers = len(sidecar["moe_layers"]) if sidecar and "moe_layers" in sidecar else None
    notes: list[str] = []
    if already:
        pass  # lowered for this target before: nothing left to fuse, and that is not a problem
    elif experts == 0:
        msg = f"{in_path}: no MoE layer was fused" + (f" (refusals: {'; '.join(map(str, ctx.log.refusals))})" if ctx.log.refusals else "")
        if config.require_fusion:
            raise MoecError(msg + "; --require-fusion makes this an error")
        notes.append(msg)
    if not already and moe_layers is not None and (gating != moe_layers or experts != moe_layers):
        notes.append(f"fused {gating} gating and {experts} expert ops, but the model has {moe_layers} MoE layers")
    from moec.passes.cleanup import untyped_values

    if untyped := untyped_values(model):
        notes.append(f"{len(untyped)} values have no dtype after shape inference (first: {untyped[0].name!r})")
    for n in notes:
        warnings.warn(n, stacklevel=2)

    lowering_name = "+".join(sorted(ctx.lowered)) or "none"
    # The graph, its data, its sidecar and the tokenizer appear together or not at all: a sidecar or
    # tokenizer that cannot be written must not leave the new graph beside an old (or no) sidecar.
    tok_dst = out_path.parent / contract.TOKENIZER_FILE
    vision = None
    with atomic_file_set(out_path) as tmp:
        _save(model, tmp / out_path.name, external)
        if vision_plan is not None:
            vision = vision_optimize.write_optimized_vision(vision_in, tmp / vision_onnx_path(out_path).name, config,
                                                            target, *vision_plan)
        if sidecar is not None:
            sidecar.update({"target": str(target), "moe_lowering": lowering_name, "precision": config.precision or sidecar.get("dtype", "fp32")})
            if ctx.gqa_layers:  # runtime/ort_backend.py updates these layers' rings in place
                sidecar[contract.GQA_LAYERS] = ctx.gqa_layers
            if quant is not None:
                sidecar["quantization"] = quant.record() | {"weights": ctx.counts.get("quantized", 0)}
                if ctx.calibration is not None:
                    sidecar["quantization"]["calibration"] = ctx.calibration.record()
            if ctx.counts.get("checkpoint_fp8"):
                sidecar.setdefault("quantization", {})["checkpoint_fp8_weights"] = ctx.counts["checkpoint_fp8"]
            write_json_atomic(contract.sidecar_path(tmp / out_path.name), sidecar)
        if tok_src is not None and tok_src.resolve() != tok_dst.resolve():
            shutil.copyfile(tok_src, tmp / contract.TOKENIZER_FILE)
    if not external:
        (out_path.parent / f"{out_path.name}.data").unlink(missing_ok=True)  # of an earlier external write
    if vision is not None and not vision["external_data"]:
        (out_path.parent / f"{vision['out_name']}.data").unlink(missing_ok=True)
    return OptimizeReport(
        in_path=str(in_path), out_path=str(out_path), target=str(target), moe_lowering=dict(ctx.lowered),
        precision=config.precision or (sidecar or {}).get("dtype", "fp32"), passes=records,
        refusals=[str(r) for r in ctx.log.refusals], fused_gating=gating, fused_experts=experts,
        moe_layers=moe_layers, warnings=notes, total_ms=(time.perf_counter() - t_start) * 1e3, vision=vision,
    )
