"""Llama 4 image preprocessing as transformers 5.24's Llama4ImageProcessor (its torchvision backend) does it.

An image becomes tiles of ``tile_size`` squared pixels: it is resized, without distortion, to fit the best canvas
of up to ``max_tiles`` tiles (as few pixels lost or invented as possible), padded with black to the canvas, cut
into tiles row by row, and, when there is more than one tile, followed by one global tile (the whole image
squashed to one tile). Pixels are rescaled to [0, 1] and normalized with mean 0.5 and std 0.5 in bfloat16, as the
original implementation does.

Pillow decodes the file and converts it to RGB (transparency composited onto white, as transformers does); the
resize is torch's antialiased uint8 bilinear kernel, the one torchvision's tensor resize calls, so the tiles are
bit-identical to transformers' (Pillow's own bilinear resize differs from it by 1 in about 1% of the pixels).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moec.common.errors import MoecError

PREPROCESSOR_FILE = "preprocessor_config.json"
# Below this a picture holds nothing to see; above it (an 8000 x 8000 photo) decoding alone needs GBs, and Pillow warns of a decompression bomb.
MIN_IMAGE_SIDE = 2
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
RESCALE_FACTOR = 1 / 255


@dataclass(frozen=True)
class ImageProcessingConfig:
    """transformers' Llama4ImageProcessor defaults; ``max_tiles`` is its ``max_patches``."""

    tile_size: int = 336
    max_tiles: int = 16
    resize_to_max_canvas: bool = False

    @classmethod
    def from_checkpoint(cls, directory: str | Path, tile_size: int) -> "ImageProcessingConfig":
        """The checkpoint's preprocessor_config.json where it has one; ``tile_size`` is the vision config's
        image_size, which the tiles must match."""
        path = Path(directory) / PREPROCESSOR_FILE
        if not path.is_file():
            return cls(tile_size=tile_size)
        try:
            data = json.loads(path.read_text())
            size = data.get("size") or {}
            config = cls(tile_size=int(size.get("height", tile_size)), max_tiles=int(data.get("max_patches", 16)),
                         resize_to_max_canvas=bool(data.get("resize_to_max_canvas", False)))
        except (ValueError, TypeError, AttributeError) as e:
            raise MoecError(f"{path} is not a valid image processor config ({e}); fix or remove it") from None
        if config.tile_size != tile_size or size.get("width", tile_size) != tile_size:
            raise MoecError(f"{path}: tile size {size} does not match the vision config's image_size {tile_size}; "
                            "check that the file belongs to this checkpoint")
        if config.max_tiles < 1:
            raise MoecError(f"{path}: max_patches must be at least 1, got {config.max_tiles}")
        return config


@dataclass(frozen=True)
class ProcessedImage:
    """``pixels_TCHW`` (bfloat16): the tiles row by row, then the global tile when ``tiles_hw`` has more than one."""

    pixels_TCHW: torch.Tensor
    tiles_hw: tuple[int, int]


def open_image(path: str | Path):
    """The image at ``path`` as an RGB PIL image, fully decoded; MoecError for a file that is not one."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MoecError(f"image {path} does not exist or is not a file")
    try:
        with Image.open(path) as image:
            width, height = image.size  # from the header: checked before the pixels are decoded
            if min(width, height) < MIN_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
                raise MoecError(f"image {path} is {width}x{height} pixels; give an image with sides of at least "
                                f"{MIN_IMAGE_SIDE} pixels and at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels")
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError:
        raise MoecError(f"{path} is not an image Pillow can read (PNG, JPEG, ...); give an image file") from None
    except Image.DecompressionBombError as e:
        raise MoecError(f"image {path} has more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels ({e}); "
                        "give a smaller image") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports a truncated or corrupt file as OSError ("image file is truncated") or SyntaxError.
        raise MoecError(f"image {path} cannot be decoded ({e}); the file is truncated or corrupt") from None


def to_rgb(image):
    """transformers' convert_to_rgb: transparency is composited onto white, every other mode converted."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def supported_canvases(max_tiles: int, tile_size: int) -> list[tuple[int, int]]:
    """Every (height, width) of up to ``max_tiles`` tiles, in transformers' order (grouped by aspect ratio, first
    seen from the most tiles down), which decides ties in ``best_fit_canvas``."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for count in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, count + 1) if count % d == 0):
            by_ratio[rows / (count // rows)].append((rows, count // rows))
    return [(rows * tile_size, cols * tile_size) for group in by_ratio.values() for rows, cols in group]


def best_fit_canvas(height: int, width: int, canvases: list[tuple[int, int]], resize_to_max_canvas: bool = False):
    """The canvas the image fits best without distortion: the smallest upscale, else the mildest downscale;
    among equal scales the smallest area. Scales are float32, as transformers computes them."""
    canvases_C2 = torch.tensor(canvases, dtype=torch.int64)
    scale_h_C, scale_w_C = canvases_C2[:, 0] / height, canvases_C2[:, 1] / width
    scales_C = torch.where(scale_h_C > scale_w_C, scale_w_C, scale_h_C)
    upscales = scales_C[scales_C >= 1]
    if len(upscales):
        chosen = upscales.max() if resize_to_max_canvas else upscales.min()
    else:
        chosen = scales_C[scales_C < 1].max()
    candidates_C2 = canvases_C2[scales_C == chosen]
    best = candidates_C2[torch.argmin(candidates_C2[:, 0] * candidates_C2[:, 1])]
    return int(best[0]), int(best[1])


def _size_without_distortion(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), target_h), 1), target_w
    return target_h, max(min(math.floor(width * scale_h), target_w), 1)


def _resize(image_CHW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(image_CHW.shape[-2:]) == (height, width):
        return image_CHW  # torchvision returns the input untouched too
    return F.interpolate(image_CHW[None], size=[height, width], mode="bilinear", align_corners=False,
                         antialias=True)[0]


def _normalize(image_CHW: torch.Tensor) -> torch.Tensor:
    # bfloat16 arithmetic, step by step as transformers' rescale_and_normalize: the same roundings.
    x = image_CHW.to(torch.bfloat16) * RESCALE_FACTOR
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.bfloat16)
    std = torch.tensor(IMAGE_STD, dtype=torch.bfloat16)
    return x.sub_(mean).div_(std)


def preprocess_image(image, config: ImageProcessingConfig = ImageProcessingConfig()) -> ProcessedImage:
    """An RGB PIL image (``open_image``) -> its tiles, as transformers' Llama4ImageProcessor makes them."""
    rgb_HWC = np.asarray(to_rgb(image), dtype=np.uint8)
    image_CHW = torch.from_numpy(rgb_HWC.copy()).permute(2, 0, 1).contiguous()
    height, width = image_CHW.shape[-2:]
    tile = config.tile_size
    canvas_h, canvas_w = best_fit_canvas(height, width, supported_canvases(config.max_tiles, tile),
                                         config.resize_to_max_canvas)
    if config.resize_to_max_canvas:
        target_h, target_w = canvas_h, canvas_w
    else:
        # An image smaller than one tile is upscaled to the tile, never further.
        target_h, target_w = min(max(height, tile), canvas_h), min(max(width, tile), canvas_w)
    new_h, new_w = _size_without_distortion(height, width, target_h, target_w)
    resized_CHW = _resize(image_CHW, new_h, new_w)
    canvas_CHW = F.pad(resized_CHW, (0, canvas_w - new_w, 0, canvas_h - new_h), value=0)
    canvas_CHW = _normalize(canvas_CHW)
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles_TCHW = canvas_CHW.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        global_CHW = _normalize(_resize(image_CHW, tile, tile))
        tiles_TCHW = torch.cat([tiles_TCHW, global_CHW[None]], dim=0)
    return ProcessedImage(pixels_TCHW=tiles_TCHW.contiguous(), tiles_hw=(rows, cols))
