"""The tiny vision tower of a multimodal demo checkpoint (``moec demo-checkpoint --layout conditional_generation
--vision``): a Llama 4 vision config small enough for tests and the main job (56-pixel tiles of 14-pixel patches,
hidden 32, 2 layers), its random weights in the checkpoint's names, and the image processor config beside it."""

from __future__ import annotations

import math

import torch

# Tiles of 56 px: 16 patches of 14 px, 4 <|patch|> tokens a tile after the 0.5 pixel shuffle; up to 4 tiles.
DEMO_VISION_CONFIG = {
    "model_type": "llama4_vision_model", "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_channels": 3, "image_size": 56, "patch_size": 14, "norm_eps": 1e-5,
    "pixel_shuffle_ratio": 0.5, "projector_input_dim": 48, "projector_output_dim": 48, "vision_output_dim": 48,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "vision_feature_select_strategy": "default",
}
DEMO_MAX_TILES = 4


def demo_preprocessor_config() -> dict:
    """preprocessor_config.json as transformers writes it for Llama4ImageProcessor (the keys moec reads)."""
    side = DEMO_VISION_CONFIG["image_size"]
    return {"image_processor_type": "Llama4ImageProcessor", "size": {"height": side, "width": side},
            "max_patches": DEMO_MAX_TILES, "resize_to_max_canvas": False, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255}


def random_vision_state(text_hidden_size: int, seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights of every vision_model.* / multi_modal_projector.* tensor, drawn in a fixed order; fan-in
    scaled so the features stay O(1) like the text embeddings they replace."""
    from moec.models.vision import VisionConfig, VisionTower

    config = VisionConfig.from_hf_dict({"vision_config": DEMO_VISION_CONFIG,
                                        "text_config": {"hidden_size": text_hidden_size}})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VisionTower(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if "norm" in name and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("bias") or len(shape) == 1:
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("positional_embedding_vlm"):
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        state[name] = t.contiguous()
    return state


# The picture an image prompt of the demo can show, written into the checkpoint beside its weights.
DEMO_IMAGE_FILE = "demo-image.png"
DEMO_IMAGE_HW = (90, 120)  # not a tile multiple: the processor resizes it to a 2 x 2 grid of 56-px tiles


def write_demo_image(path, hw: tuple[int, int] = DEMO_IMAGE_HW) -> None:
    """A deterministic RGB picture (a colour gradient with a square in it), written with Pillow: no random bytes,
    so the file is the same everywhere and reads as a picture, not noise."""
    import numpy as np
    from PIL import Image

    h, w = hw
    y, x = np.mgrid[0:h, 0:w]
    rgb_HWC = np.stack([255 * x / (w - 1), 255 * y / (h - 1), np.full((h, w), 96.0)], axis=-1)
    rgb_HWC[h * 2 // 9:h * 2 // 3, w // 4:w * 7 // 12] = (250, 250, 250)  # [20:60, 30:70] at 90 x 120
    Image.fromarray(rgb_HWC.round().astype(np.uint8), "RGB").save(path, format="PNG")
