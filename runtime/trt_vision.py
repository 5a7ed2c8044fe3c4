"""The vision engine of an engine folder (``vision.<arch>.plan``, listed under ``vision`` in manifest.json) as a
``VisionRunner``: ``moec run ENGINE_DIR --image`` and ``moec bench ENGINE_DIR`` encode images through the same
code as the ONNX Runtime path (runtime/vision.py); only ``_execute`` (bind named inputs, enqueue, read the
outputs) and ``_load_engine`` (deserialize) are TensorRT's, and those two need a GPU.

Everything before them runs on a CPU and is checked the way the text engine is: the manifest's vision entry,
its engine for this GPU (the text engine's flavour, version and arch rules, through ``select_engine``), the
file's sha256 and header, the vision metadata it names, and the input's dtype from the engine's own I/O list.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moec.common.confine import plain_file_name
from moec.common.errors import MoecError
from moec.runtime import trt_engines
from moec.runtime.vision import FEATURES, PIXELS, VisionRunner, read_vision_sidecar

_FIX = "rebuild the engine directory with `moec build` from a graph exported with --vision"
# The engine I/O dtypes a vision engine can have (compiler/build/network.network_io's spelling).
_NUMPY_DTYPES = {"float": np.float32, "half": np.float16, "bf16": None}


@dataclass
class _EngineHandles:
    engine: Any
    context: Any
    device: Any
    stream: Any
    keep: tuple = ()  # what must outlive the engine (its runtime, the logger)


def vision_entry(manifest: dict, engine_dir: Path) -> dict:
    """The manifest's ``vision`` entry, its shape checked (the manifest schema predates it); MoecError naming the
    field, or saying the folder was built from a text-only export."""
    vision = manifest.get("vision")
    if vision is None:
        raise MoecError(f"{engine_dir} was built from a text-only export (its manifest lists no vision engine); "
                        "export with --vision, then `moec build`, for image prompts")
    where = f"{engine_dir / 'manifest.json'} vision"
    engines = vision.get("engines") if isinstance(vision, dict) else None
    if not isinstance(engines, list) or not engines or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("archs"), list)
            for e in engines):
        raise MoecError(f"{where}: engines must be a non-empty list of {{file, archs, sha256}}; {_FIX}")
    for i, e in enumerate(engines):
        plain_file_name(engine_dir, e.get("file"), f"{where}.engines[{i}].file", _FIX)
    plain_file_name(engine_dir, vision.get("sidecar"), f"{where}.sidecar", _FIX)
    io = vision.get("io")
    if not isinstance(io, dict) or [t.get("name") for t in io.get("inputs", [])] != [PIXELS] \
            or FEATURES not in [t.get("name") for t in io.get("outputs", [])]:
        raise MoecError(f"{where}.io must list the input {PIXELS} and the output {FEATURES}; {_FIX}")
    ranges = (vision.get("profile") or {}).get(PIXELS) if isinstance(vision.get("profile"), dict) else None
    if not isinstance(ranges, list) or len(ranges) != 3 or not all(
            isinstance(r, list) and len(r) == 4 and all(isinstance(d, int) for d in r) for r in ranges):
        raise MoecError(f"{where}.profile.{PIXELS} must be [min, opt, max] shapes of 4 integers; {_FIX}")
    return vision


def _input_dtype(vision: dict, engine_dir: Path):
    name = vision["io"]["inputs"][0]["dtype"]
    if _NUMPY_DTYPES.get(name) is None:
        raise MoecError(f"{engine_dir}: the vision engine's input {PIXELS} is {name}; moec feeds it float or half: "
                        f"{_FIX}")
    return _NUMPY_DTYPES[name]


class TrtVisionEncoder(VisionRunner):
    """``__init__`` only wires parts together (so the checks and the shared encode run with stand-ins on a CPU);
    ``from_engine_dir`` is the real entry point."""

    def __init__(self, engine_dir: Path, engine_path: Path, vision: dict, metadata: dict,
                 handles: _EngineHandles | None):
        self.engine_dir = engine_dir
        self.path = engine_path
        self.vision = vision
        self.metadata = metadata
        self.handles = handles
        self._dtype = _input_dtype(vision, engine_dir)
        lo, hi = vision["profile"][PIXELS][0], vision["profile"][PIXELS][-1]
        self._tiles = (int(lo[0]), int(hi[0]))

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path) -> TrtVisionEncoder:
        engine_dir = Path(engine_dir)
        manifest = trt_engines.load_manifest(engine_dir)
        vision = vision_entry(manifest, engine_dir)
        flavour = trt_engines.import_trt(manifest["trt"]["flavour"])
        # The text engine's rules (flavour, version, this GPU's arch, the file's sha256 and header) for the
        # vision engines: the same manifest with the vision engines in place of the text ones (no plugins).
        as_text = {**manifest, "engines": vision["engines"], "plugins": []}
        engine_path = trt_engines.select_engine(as_text, engine_dir, trt_engines.HostTrt.detect(flavour))
        metadata = read_vision_sidecar(engine_dir / vision["sidecar"])
        compatible = bool(manifest.get("build_options", {}).get("version_compatible"))
        return cls(engine_dir, engine_path, vision, metadata, _load_engine(flavour, engine_path, compatible))

    def encode(self, pixels_TCHW: np.ndarray) -> np.ndarray:
        lo, hi = self._tiles
        if not lo <= pixels_TCHW.shape[0] <= hi:
            raise MoecError(f"{pixels_TCHW.shape[0]} tiles but the vision engine {self.path} takes {lo} to {hi}; "
                            "give fewer or smaller images")
        return super().encode(pixels_TCHW)

    def _execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bind ``inputs`` by name, give every output a buffer of the shape TensorRT resolves, enqueue, copy back."""
        import torch

        h = self.handles
        ctx, device = h.context, h.device
        on_stream = torch.cuda.stream(h.stream) if device.type == "cuda" else contextlib.nullcontext()
        with on_stream:
            feeds = {n: torch.from_numpy(np.ascontiguousarray(a)).to(device) for n, a in inputs.items()}
        for name, t in feeds.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise MoecError(f"{self.path}: TensorRT refused input {name} shape {list(t.shape)}; the manifest "
                                f"does not match the engine: {_FIX}")
            ctx.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for desc in self.vision["io"]["outputs"]:
            dtype = {"float": torch.float32, "half": torch.float16}[desc["dtype"]]
            out = torch.empty(tuple(ctx.get_tensor_shape(desc["name"])), dtype=dtype, device=device)
            ctx.set_tensor_address(desc["name"], out.data_ptr())
            outputs[desc["name"]] = out
        if not ctx.execute_async_v3(h.stream.cuda_stream):
            raise MoecError(f"{self.path}: TensorRT failed to enqueue the vision engine (see its log above)")
        h.stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outputs.items()}


def _load_engine(flavour, engine_path: Path, version_compatible: bool) -> _EngineHandles:
    """Deserialize the vision engine on this GPU, with its own context and stream."""
    import torch

    trt = flavour.trt
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    # As TrtBackend: a version-compatible engine carries its lean runtime (the sha256 check vouched for the file).
    runtime.engine_host_code_allowed = version_compatible
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise MoecError(f"{engine_path}: {flavour.name} could not deserialize the vision engine (see its log above); "
                        f"{_FIX}")
    device = torch.device("cuda", torch.cuda.current_device())
    return _EngineHandles(engine, engine.create_execution_context(), device, torch.cuda.Stream(device),
                          (runtime, logger))
