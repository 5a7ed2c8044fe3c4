"""The vision graph's engines, built beside the text model's by ``moec build`` when OUT.vision.onnx lies beside
the .onnx it builds (``moec export --vision``): one plan per arch, named ``vision.<arch>.plan``, one optimization
profile over the tile count, listed under ``vision`` in the same manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

from moec.common import contract


def vision_engine_file_name(arch: str) -> str:
    return f"vision.{arch}.plan"


def vision_profile(meta: dict) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Tiles from 1 to the graph's maximum, tuned for one image of the processor's largest grid (+ global tile)."""
    side, most = meta["tile_size"], meta["max_tiles"]
    opt = min(meta["max_tiles_per_image"] + 1, most)
    return (1, 3, side, side), (opt, 3, side, side), (most, 3, side, side)


def build_vision_engines(flavour, text_onnx: Path, out_dir: Path, archs: list[str], logger, display, config) -> dict | None:
    """Build the vision engines into ``out_dir`` (the build's temporary folder); their manifest entry, or None
    when no vision graph lies beside ``text_onnx``."""
    from moec.compiler.build import Profile, build_serialized, builder_config, network_from_onnx
    from moec.compiler.build.network import network_io
    from moec.compiler.export_vision import PIXELS, read_vision_metadata, vision_onnx_path

    vision = vision_onnx_path(text_onnx)
    if not vision.is_file():
        return None
    meta = read_vision_metadata(vision)
    builder, network, _keep = network_from_onnx(flavour, vision, logger)
    profile = Profile("vision", {PIXELS: vision_profile(meta)})
    entries = []
    for arch in archs:
        cfg = builder_config(flavour, builder, network, arch, [profile], config, None, logger, [])
        name = vision_engine_file_name(arch)
        sha, size = build_serialized(flavour, builder, network, cfg, logger, display, arch, out_dir / name)
        entries.append({"file": name, "archs": [arch], "sha256": sha, "bytes": size})
    side = contract.sidecar_path(vision)
    shutil.copy2(side, out_dir / side.name)
    # io: what the runtime binds (runtime/trt_vision.py checks its inputs against it); precision: the graph's
    # (moec optimize's, else the export's dtype).
    return {"engines": entries, "sidecar": side.name, "profile": {PIXELS: [list(s) for s in vision_profile(meta)]},
            "io": network_io(network), "precision": meta.get("precision") or meta.get("dtype", "fp32")}
