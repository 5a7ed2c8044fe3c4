"""Building engines: network -> builder config -> serialized plan for every arch, written with the
manifest, the sidecar and the tokenizer as one atomic output folder."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib
import importlib.metadata
import json
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
from moec.common import contract
from moec.common.artifacts import atomic_dir, check_output_dir
from moec.common.errors import MoecError
from moec.common.onnx_files import (
    load_graph_structure,
    require_moec_io,
)
from moec.common.outputs import check_option_output
from moec.common.sidecar import model_tokenizer, read_sidecar
from moec.compiler.build.config import BuildConfig, BuildResult
from moec.compiler.build.network import (
    _errors,
    _register_moec_plugin,
    check_external_data,
    graph_precision,
    make_logger,
    network_from_onnx,
    network_io,
    network_layers,
    plugins_needed,
)
from moec.compiler.build.profiles import (
    Limits,
    Profile,
    _profiles_json,
    build_profiles,
    check_named_dims,
    kv_cache_summary,
    limits_of,
    profile_limits,
    sidecar_ring_inputs,
)
from moec.compiler.build.progress import (
    ProgressDisplay,
    _sigint_cancels,
    make_progress_monitor,
)
from moec.compiler.build.timing_cache import (
    _KeptTimingCache,
    load_timing_cache,
    save_timing_cache,
)
from moec.runtime.bench import source_hashes
from moec.runtime.trt_backend import (
    MANIFEST_FORMAT,
    TrtFlavour,
    import_trt,
    local_gpu_arch,
    parse_arch,
)


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
                        "build on a GPU host, or use --builder trt-rtx for sm75/sm80/sm86/sm89/sm120/sm121")
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
            from moec.compiler.build.stream import make_plan_writer

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


def _moec_version() -> str:
    try:
        return importlib.metadata.version("moec")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def engine_file_name(arch: str) -> str:
    return f"engine.{arch}.plan"


# --- The whole stage -------------------------------------------------------------------------------
def build_engine(onnx_path: str | Path, out_dir: str | Path, config: BuildConfig = BuildConfig(),
                 display: ProgressDisplay | None = None, layer_range=None) -> BuildResult:
    """Build one engine per arch in ``config.archs`` from ``onnx_path`` into ``out_dir`` (atomically).
    ``layer_range``: build only that range of the graph (moec.runtime.layer_chain.LayerRange, cut
    from ``onnx_path`` by moec.compiler.build.chain, which checks the whole graph's I/O)."""
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
                            "drop the flag, or build with --builder trt")
        if config.hardware_compat != "none":
            # Like --version-compatible: an option with no effect is refused, never recorded as if it applied.
            raise MoecError(f"--hardware-compat {config.hardware_compat} does not apply to TensorRT-RTX: each engine runs "
                            "on the compute capability it was built for; list the archs with --arch instead, or build "
                            "with --builder trt")
    sidecar = read_sidecar(onnx_path)
    tokenizer = model_tokenizer(onnx_path.parent, sidecar, onnx_path)  # shipped in the engine folder
    if layer_range is not None:
        tokenizer = None  # a chain ships one, in its own folder beside chain.json (compiler/build/chain.py)
    from moec.compiler.quantize_stage import check_engine_archs

    check_engine_archs(sidecar, archs, onnx_path)
    check_external_data(onnx_path)
    model = load_graph_structure(onnx_path) if layer_range is None else layer_range.model
    if layer_range is None:
        require_moec_io(onnx_path, model, sidecar["num_layers"], "image_token_id" in sidecar)
    source = source_hashes(onnx_path)
    plugins = plugins_needed(model)
    if plugins:
        _register_moec_plugin(flavour, notes)

    logger = make_logger(trt)
    builder, network, _parser = network_from_onnx(flavour, onnx_path, logger,
                                                  None if layer_range is None else layer_range.model)
    limits = profile_limits(sidecar, config)
    profiles = build_profiles(network, limits, config)
    check_named_dims(model, profiles)
    planned = limits
    limits = limits_of(profiles, limits.max_positions, sidecar_ring_inputs(sidecar))
    if layer_range is not None and limits.max_past == 0:
        # A range of chunked layers reads rings only (fixed slots): its past limit is the model's.
        limits = dataclasses.replace(limits, max_past=planned.max_past)
    try:
        if layer_range is not None:  # the chain's plan covers every range (compiler/build/chain.py)
            memory, context_note = None, ""
        else:
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
        from moec.compiler.build.vision import build_vision_engines

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
        if layer_range is not None:
            manifest["layer_range"] = {"index": layer_range.index, "layers": layer_range.layers,
                                       "inputs": list(layer_range.inputs), "outputs": list(layer_range.outputs)}
        if vision is not None:
            manifest["vision"] = vision  # the vision graph's engines (compiler/build/vision.py)
        if config.engine_split is not None and layer_range is None:
            manifest["engine_split"] = config.engine_split  # why one engine (compiler/build/split.py)
        (tmp / contract.ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Inside the folder's transaction: a cache that cannot be written fails the build before
        # the engine folder appears, not after.
        save_timing_cache(timing_cache, config.timing_cache)
    return BuildResult(out_dir, manifest, engines, notes, time.perf_counter() - t0)


def _engine_memory(sidecar: dict[str, Any], model: onnx.ModelProto, limits: Limits,
                   config: BuildConfig) -> tuple[dict[str, Any], str]:
    """moec plan's numbers for this engine (weights as built, KV and activations at its limits),
    and the sentence that says where the context came from when it was the default."""
    from moec.compiler.plan import DEFAULT_CONTEXT, engine_memory, onnx_weight_bytes
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
