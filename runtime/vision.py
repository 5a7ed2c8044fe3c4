"""The vision graph beside a text export (OUT.vision.onnx, ``moec export --vision``): its file name, its metadata,
and an ONNX Runtime session that turns normalized tiles into image features. Used by ``moec run --image`` and by
``moec bench``, which times the encoder apart from prefill and decode."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from moec.common import contract
from moec.common.errors import MoecError

PIXELS = "pixel_values"  # [tiles, 3, tile, tile], normalized (models/image_processing.py)
FEATURES = "image_features"  # [tiles * patches_per_tile, text hidden]: one row per <|patch|> token
DIM_TILES = "tiles"
VISION_FORMAT = "moec-vision"


def vision_onnx_path(text_onnx: str | os.PathLike) -> Path:
    """OUT.vision.onnx beside OUT.onnx: the name says which graph is the vision one."""
    p = Path(text_onnx)
    return p.with_name(p.stem + ".vision.onnx")


def read_vision_metadata(vision_onnx: Path) -> dict:
    return read_vision_sidecar(contract.sidecar_path(vision_onnx))


def read_vision_sidecar(side: Path) -> dict:
    """The vision graph's metadata in the file ``side`` itself (an engine folder names it in its manifest)."""
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise MoecError(f"{side} is missing (the vision graph's metadata); re-export with `moec export --vision`") from None
    except (OSError, ValueError) as e:
        raise MoecError(f"{side} is not readable moec metadata ({e}); re-export with `moec export --vision`") from None
    if not isinstance(meta, dict) or meta.get("format") != VISION_FORMAT:
        raise MoecError(f"{side} is not the metadata of a moec vision graph; re-export with `moec export --vision`")
    return meta


class VisionRunner:
    """pixels [T, 3, tile, tile] (float32) -> features [T * patches_per_tile, hidden] (float32): the checks and
    conversions every backend shares; a backend implements ``_execute`` (run the graph or engine on named inputs)
    and sets ``path``, ``metadata`` and ``_dtype`` (the input's numpy dtype)."""

    path: Path
    metadata: dict
    _dtype: type

    def encode(self, pixels_TCHW: np.ndarray) -> np.ndarray:
        if pixels_TCHW.shape[0] > self.metadata["max_tiles"]:
            raise MoecError(f"{pixels_TCHW.shape[0]} tiles but {self.path} takes at most {self.metadata['max_tiles']}; "
                            "give fewer or smaller images")
        return self._execute({PIXELS: pixels_TCHW.astype(self._dtype)})[FEATURES].astype(np.float32)

    def _execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class OrtVisionEncoder(VisionRunner):
    """The vision graph on ONNX Runtime's CPU provider."""

    def __init__(self, vision_onnx: Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = vision_onnx
        self.metadata = read_vision_metadata(vision_onnx)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(vision_onnx), sess_options=opts, providers=["CPUExecutionProvider"])
        self._dtype = np.float16 if self.metadata.get("dtype") == "fp16" else np.float32

    def _execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {FEATURES: self.session.run([FEATURES], inputs)[0]}


def time_vision_encoder(text_onnx: Path, repeats: int, warmup: int, threads: int | None = None) -> list[float] | None:
    """Milliseconds per encode of one image at the processor's largest grid (its tiles + the global tile), or None
    when no vision graph lies beside ``text_onnx``."""
    vision = vision_onnx_path(text_onnx)
    if not vision.is_file():
        return None
    return time_encoder(OrtVisionEncoder(vision, threads), repeats, warmup)


def time_encoder(encoder: VisionRunner, repeats: int, warmup: int) -> list[float]:
    """Milliseconds per ``encoder.encode`` of one image at the processor's largest grid (+ the global tile)."""
    meta = encoder.metadata
    tiles = min(meta["max_tiles_per_image"] + (meta["max_tiles_per_image"] > 1), meta["max_tiles"])
    pixels = np.random.default_rng(0).uniform(-1, 1, (tiles, 3, meta["tile_size"], meta["tile_size"]))
    pixels = pixels.astype(np.float32)
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        encoder.encode(pixels)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times
