"""``moec run --image``: image files -> the prompt's image tokens and the features that replace them.

The vision encoder runs once, before the generation loop: on torch from the checkpoint's own vision tower, on
ONNX Runtime from OUT.vision.onnx beside the text graph (``moec export --vision``), on TensorRT from the engine
folder's vision engine (runtime/trt_vision.py; the same encode as ONNX Runtime's). Its time is reported apart
from prefill and decode."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from moec.common.errors import MoecError


@dataclass(frozen=True)
class ImagePrompt:
    ids: list[int]  # the prompt with every image's tokens laid out
    features_NH: np.ndarray  # one row per <|patch|> token, in order
    tiles_hw: list[tuple[int, int]]
    vision_s: float  # the vision encoder's time (preprocessing excluded)


@dataclass(frozen=True)
class VisionEncoder:
    metadata: dict  # export_vision.vision_metadata's keys
    encode: Callable[[np.ndarray], np.ndarray]  # pixels [T, 3, tile, tile] float32 -> features [T * P', hidden]
    source: str


def open_vision_encoder(artifact: Path, backend: str) -> VisionEncoder:
    """The vision tower that belongs to ``artifact``; MoecError for a text-only one."""
    from moec.compiler.export_vision import VisionExportConfig, vision_metadata
    from moec.runtime.vision import OrtVisionEncoder, vision_onnx_path

    if backend == "torch":
        import torch

        from moec.models.checkpoint import load_vision_tower

        tower = load_vision_tower(artifact)  # MoecError for a text-only checkpoint

        def encode(pixels: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return tower(torch.from_numpy(pixels)).float().numpy()

        return VisionEncoder(vision_metadata(artifact, VisionExportConfig()), encode, str(artifact))
    if backend == "ort":
        if artifact.is_dir():
            raise MoecError(f"--image is not supported for the partition folder {artifact}; run an .onnx export")
        vision = vision_onnx_path(artifact)
        if not vision.is_file():
            raise MoecError(f"--image needs the vision graph {vision.name} beside {artifact}, which was exported for "
                            "text only; export the checkpoint with `moec export --vision`")
        encoder = OrtVisionEncoder(vision)
        return VisionEncoder(encoder.metadata, encoder.encode, str(vision))
    if backend == "trt":
        from moec.runtime.trt_vision import TrtVisionEncoder

        encoder = TrtVisionEncoder.from_engine_dir(artifact)  # MoecError for a folder built text-only
        return VisionEncoder(encoder.metadata, encoder.encode, str(encoder.path))
    raise MoecError(f"--image runs on the torch, ort and trt backends, not {backend}")


def prepare_image_prompt(image_paths: Sequence[Path], prompt_ids: Sequence[int], tokenizer, encoder: VisionEncoder,
                         bos_id: int | None, text_image_token_id: int | None) -> ImagePrompt:
    """Decode, tile and encode the images; lay their tokens into the prompt (at its <|image|> slots, else first)."""
    from moec.models.image_processing import ImageProcessingConfig, open_image, preprocess_image
    from moec.models.image_prompt import ImageTokenIds, expand_image_slots

    meta = encoder.metadata
    if tokenizer is None:
        raise MoecError("--image needs the model's tokenizer.json (for the image tokens); pass --checkpoint DIR")
    ids = ImageTokenIds.from_tokenizer(tokenizer, "the tokenizer")
    if ids.patch != meta["image_token_id"] or text_image_token_id not in (None, ids.patch):
        raise MoecError(f"the tokenizer's <|patch|> id {ids.patch} is not the model's image token "
                        f"{meta['image_token_id']}; use the checkpoint's own tokenizer.json")
    config = ImageProcessingConfig(meta["tile_size"], meta["max_tiles_per_image"], meta["resize_to_max_canvas"])
    images = [preprocess_image(open_image(p), config) for p in image_paths]
    pixels = np.concatenate([im.pixels_TCHW.float().numpy() for im in images])
    if pixels.shape[0] > meta["max_tiles"]:
        raise MoecError(f"the images make {pixels.shape[0]} tiles but {encoder.source} takes at most "
                        f"{meta['max_tiles']}; give fewer or smaller images")
    tiles = [im.tiles_hw for im in images]
    laid_out = expand_image_slots(prompt_ids, tiles, meta["patches_per_tile"], ids, bos_id=bos_id)
    t0 = time.perf_counter()
    features = encoder.encode(pixels)
    return ImagePrompt(laid_out, features, tiles, time.perf_counter() - t0)
