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

from moec.compiler.build.config import HARDWARE_COMPAT, BuildConfig, BuildResult
from moec.compiler.build.engine import (
    _engine_memory,
    _moec_version,
    build_engine,
    build_serialized,
    builder_config,
    check_archs,
    engine_file_name,
)
from moec.compiler.build.inspect import _inspect_with_trt, inspect_engine_dir
from moec.compiler.build.network import (
    _ONNX_DTYPE_NAMES,
    _all_nodes,
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
    CUSTOM_PROFILE,
    PROFILE_NAMES,
    Limits,
    Profile,
    Ranges,
    Shape,
    _profiles_json,
    _tensor_ranges,
    apply_overrides,
    axis_roles,
    build_profiles,
    check_named_dims,
    context_positions,
    kv_cache_summary,
    limits_of,
    parse_shapes,
    phase_ranges,
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
    _timing_cache_header_ok,
    load_timing_cache,
    save_timing_cache,
)

__all__ = [
    "HARDWARE_COMPAT",
    "BuildConfig",
    "BuildResult",
    "make_logger",
    "_errors",
    "network_from_onnx",
    "check_external_data",
    "plugins_needed",
    "_all_nodes",
    "_ONNX_DTYPE_NAMES",
    "graph_precision",
    "network_io",
    "network_layers",
    "_register_moec_plugin",
    "Shape",
    "Ranges",
    "PROFILE_NAMES",
    "CUSTOM_PROFILE",
    "Profile",
    "Limits",
    "profile_limits",
    "context_positions",
    "phase_ranges",
    "axis_roles",
    "_tensor_ranges",
    "parse_shapes",
    "apply_overrides",
    "build_profiles",
    "check_named_dims",
    "limits_of",
    "sidecar_ring_inputs",
    "kv_cache_summary",
    "_profiles_json",
    "ProgressDisplay",
    "make_progress_monitor",
    "_sigint_cancels",
    "load_timing_cache",
    "_timing_cache_header_ok",
    "_KeptTimingCache",
    "save_timing_cache",
    "inspect_engine_dir",
    "_inspect_with_trt",
    "builder_config",
    "check_archs",
    "build_serialized",
    "_moec_version",
    "engine_file_name",
    "build_engine",
    "_engine_memory",
]
