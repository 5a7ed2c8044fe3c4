"""moec's Llama 4 image preprocessing against transformers 5.24's Llama4ImageProcessor: the same tiles, bit for bit
(bfloat16), and the same tile grid; unreadable or absurd images are named errors."""

import hashlib
import struct
import zlib

import numpy as np
import pytest
import torch
from hf_image_reference import hf_image_processor_class

from moec.common.errors import MoecError
from moec.models.image_processing import (ImageProcessingConfig, best_fit_canvas, open_image, preprocess_image,
                                          supported_canvases)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

# (tile, max_tiles, resize_to_max_canvas, (height, width)): downscale, upscale, tiny, exact fit, tall, wide.
CASES = [
    (336, 16, False, (500, 700)), (336, 16, False, (30, 20)), (336, 16, False, (1000, 1000)),
    (336, 16, False, (2000, 300)), (336, 16, False, (100, 4000)), (336, 16, True, (337, 401)),
    (28, 4, False, (57, 57)), (28, 4, False, (20, 90)), (28, 4, True, (5, 5)), (56, 2, False, (100, 40)),
]


def _image(height: int, width: int, mode: str = "RGB"):
    pixels = np.random.RandomState(height * 7919 + width).randint(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(pixels, "RGBA")


def _digest(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("tile,max_tiles,to_max,size", CASES)
def test_tiles_equal_transformers(tile, max_tiles, to_max, size):
    processor = hf_image_processor_class()(size={"height": tile, "width": tile}, max_patches=max_tiles,
                                           resize_to_max_canvas=to_max)
    image = _image(*size)
    expected = processor(images=[image], return_tensors="pt")
    got = preprocess_image(image, ImageProcessingConfig(tile, max_tiles, to_max))
    assert got.tiles_hw == tuple(expected["aspect_ratios"][0].tolist())
    assert got.pixels_TCHW.dtype == torch.bfloat16
    assert torch.equal(got.pixels_TCHW, expected["pixel_values"])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_modes_convert_as_transformers(mode):
    processor = hf_image_processor_class()(size={"height": 28, "width": 28}, max_patches=4)
    image = _image(40, 30, mode)
    got = preprocess_image(image, ImageProcessingConfig(28, 4))
    assert torch.equal(got.pixels_TCHW, processor(images=[image], return_tensors="pt")["pixel_values"])


# Recorded from transformers 5.24 (test_tiles_equal_transformers checks them live where torchvision imports).
GOLDEN = {
    (336, 16, False, (500, 700)): ((2, 3), "8dfd6b0c9e6c9e34"),
    (28, 4, False, (57, 57)): ((2, 2), "a3cbade943bce500"),
    (56, 2, False, (100, 40)): ((2, 1), "953152ba5223c3ec"),
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_tiles_equal_recorded_transformers_output(case):
    """Where torchvision is missing, the live comparison skips; this one still checks the same numbers."""
    tile, max_tiles, to_max, size = case
    tiles_hw, digest = GOLDEN[case]
    got = preprocess_image(_image(*size), ImageProcessingConfig(tile, max_tiles, to_max))
    assert got.tiles_hw == tiles_hw
    assert got.pixels_TCHW.shape == (tiles_hw[0] * tiles_hw[1] + 1, 3, tile, tile)
    assert _digest(got.pixels_TCHW) == digest


def test_best_fit_prefers_least_scaling_then_least_area():
    canvases = supported_canvases(4, 10)
    assert best_fit_canvas(10, 10, canvases) == (10, 10)  # fits one tile exactly
    assert best_fit_canvas(10, 20, canvases) == (10, 20)
    assert best_fit_canvas(10, 10, canvases, resize_to_max_canvas=True) == (20, 20)  # the largest upscale
    assert best_fit_canvas(100, 100, canvases) == (20, 20)  # no upscale possible: the mildest downscale


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_unreadable_and_absurd_images_are_named_errors(tmp_path):
    good = tmp_path / "good.png"
    _image(64, 80).save(good)
    assert open_image(good).size == (80, 64)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _image(1, 1).save(tmp_path / "one.png")
    (tmp_path / "huge.png").write_bytes(_png_header(100_000, 100_000))
    (tmp_path / "big.png").write_bytes(_png_header(9000, 9000))  # under Pillow's own bomb limit, over moec's
    expected = {"text.png": "not an image", "truncated.png": "truncated", "one.png": "1x1 pixels",
                "huge.png": "more than 64 megapixels", "big.png": "9000x9000", "missing.png": "does not exist"}
    for name, message in expected.items():
        with pytest.raises(MoecError, match=message) as e:
            open_image(tmp_path / name)
        assert "\n" not in str(e.value)
