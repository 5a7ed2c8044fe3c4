"""Inspecting an engine folder: its manifest checked, and what TensorRT says of each engine."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from moec.common.errors import MoecError
from moec.compiler.build.network import _errors, make_logger
from moec.runtime.trt_backend import (
    TrtFlavour,
    engine_problems,
    engine_profiles,
    import_trt,
    load_manifest,
    local_gpu_arch,
    manifest_problems,
    max_prompt_tokens,
    read_engine_header,
)
from moec.runtime.trt_backend import (
    ring_inputs as ring_inputs_of_engine,
)


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
