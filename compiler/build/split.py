"""One engine or a chain of layer-range engines: what ``moec build`` / ``moec compile`` build when
``--layers-per-engine`` is left out (``auto``).

A Scout engine built whole needs ~1.8x its weights of host memory (moec.compiler.plan's
build-host estimate, measured), about 390 GB; a user running ``moec compile`` on a real checkpoint
wants it to succeed on the host they have. So ``auto`` keeps one engine when the estimate fits the
host's available memory and otherwise builds a chain (compiler/build/chain.py) of the most layers
per engine that fit, and says so in one line. ``--layers-per-engine all`` forces one engine (the
estimate only warns), ``--layers-per-engine N`` a chain of N. The choice and its figures go into
the engine folder's manifest.json or chain.json as ``engine_split``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from moec.common.errors import MoecError

from moec.compiler.plan import BUILD_RSS_BASE, BUILD_RSS_RATIO, build_host_bytes

AUTO = "auto"
ONE_ENGINE = "all"
HOW_TO_FORCE = f"--layers-per-engine {ONE_ENGINE} forces one engine"


def check_layers_per_engine(value) -> None:
    """``BuildConfig.layers_per_engine``: None or "auto", "all" (one engine) or a layer count >= 1."""
    if value is None or value in (AUTO, ONE_ENGINE):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MoecError(f"--layers-per-engine {value}: give at least 1 (layers per engine), {ONE_ENGINE} for one engine, "
                        f"or {AUTO} (the default: one engine when its build fits the host's memory)")


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """What a cgroup v2 memory limit leaves this process's group (a container's limit is often
    far below the machine's MemAvailable)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def host_available_bytes() -> int:
    """Host memory a build can take now: MemAvailable (what is free or reclaimable without
    swapping other processes out), capped by the cgroup's limit; physical memory where neither is
    known."""
    figures = [b for b in (_meminfo_available(), _cgroup_room()) if b is not None]
    return min(figures) if figures else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class EngineSplit:
    """What will be built: ``layers_per_engine`` None is one engine."""

    requested: str | int  # "auto", "all" or N, as given
    layers_per_engine: int | None
    weight_bytes: int | None = None
    build_host_bytes_estimate: int | None = None  # one engine's build (moec.compiler.plan.build_host_bytes)
    host_available_bytes: int | None = None
    note: str = ""  # the line moec prints about the choice; "" when there is nothing to say

    def to_json(self) -> dict:
        return asdict(self)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _graph_figures(onnx_path: Path) -> tuple[int, int] | None:
    from moec.common.onnx_files import load_graph_structure
    from moec.common.sidecar import read_sidecar
    from moec.compiler.plan import onnx_weight_bytes

    try:
        return onnx_weight_bytes(load_graph_structure(onnx_path)), int(read_sidecar(onnx_path)["num_layers"])
    except (MoecError, OSError, KeyError, ValueError):
        return None  # the build itself names what is wrong with the graph


def _has_vision_graph(onnx_path: Path) -> bool:
    from moec.compiler.export_vision import vision_onnx_path

    return vision_onnx_path(onnx_path).is_file()


def choose_engine_split(onnx_path: str | Path, requested=None, host: int | None = None) -> EngineSplit:
    """The split ``moec build`` uses for ``onnx_path`` given ``--layers-per-engine`` ``requested``
    (None or "auto": by ``host`` bytes, default the host's available memory)."""
    requested = AUTO if requested is None else requested
    if isinstance(requested, int):
        return EngineSplit(requested, requested)
    figures = _graph_figures(Path(onnx_path))
    if figures is None:
        return EngineSplit(requested, None)
    weights, num_layers = figures
    host = host_available_bytes() if host is None else host
    need = build_host_bytes(weights)
    split = dict(requested=requested, weight_bytes=weights, build_host_bytes_estimate=need, host_available_bytes=host)
    why = (f"building {_gb(weights)} of weights as one engine needs about {_gb(need)} of host memory "
           f"({BUILD_RSS_RATIO}x the weights + {BUILD_RSS_BASE >> 20} MB, estimated) and this host has {_gb(host)} available")
    if need <= host:
        return EngineSplit(layers_per_engine=None, **split)
    if requested == ONE_ENGINE:
        return EngineSplit(layers_per_engine=None, note=f"{why}: building one engine as --layers-per-engine "
                           f"{ONE_ENGINE} asks; it may run out of memory (leave the option out to build a chain that fits)",
                           **split)
    if num_layers < 2:
        return EngineSplit(layers_per_engine=None, note=f"{why}; a one-layer model cannot be split: building one engine, "
                           "which may run out of memory (build on a larger host)", **split)
    if _has_vision_graph(Path(onnx_path)):
        return EngineSplit(layers_per_engine=None, note=f"{why}; a chain runs text only and this model has a vision "
                           "graph: building one engine, which may run out of memory (pass --layers-per-engine N for a "
                           "text-only chain)", **split)
    from moec.compiler.build.chain import suggest_layers_per_engine

    fits = suggest_layers_per_engine(weights, num_layers, host)
    n = min(fits or 1, num_layers - 1)  # not even one layer fits: the smallest ranges still come closest
    tail = "" if fits else " (even one layer's build may not fit: build on a larger host if it runs out of memory)"
    return EngineSplit(layers_per_engine=n, note=f"{why}: building a chain of engines of {n} layer{'s' * (n > 1)} each "
                       f"instead{tail}; {HOW_TO_FORCE}", **split)
