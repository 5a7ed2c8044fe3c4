"""The image side of a Llama 4 prompt, as transformers 5.24's Llama4Processor lays it out, and the merge of image
features into the prompt's embeddings, as Llama4ForConditionalGeneration.forward does it.

Per image: ``<|image_start|>``; when the image has more than one tile, each row of tiles as the tiles' ``<|patch|>``
runs joined by ``<|tile_x_separator|>`` and closed by ``<|tile_y_separator|>``; then ``<|image|>`` and the global
tile's ``<|patch|>`` run (the only tile of a one-tile image); ``<|image_end|>``. The prompt marks where each image
goes with one ``<|image|>`` (what the chat template writes for an image content item); the layout replaces it.
Image features replace the embeddings at the ``<|patch|>`` positions, in order (the config's image_token_index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from moec.common.errors import MoecError

IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
IMAGE = "<|image|>"
PATCH = "<|patch|>"
TILE_X_SEPARATOR = "<|tile_x_separator|>"
TILE_Y_SEPARATOR = "<|tile_y_separator|>"
IMAGE_TOKENS = (IMAGE_START, IMAGE_END, IMAGE, PATCH, TILE_X_SEPARATOR, TILE_Y_SEPARATOR)


@dataclass(frozen=True)
class ImageTokenIds:
    image_start: int
    image_end: int
    image: int
    patch: int
    tile_x_separator: int
    tile_y_separator: int

    @classmethod
    def from_tokenizer(cls, tokenizer, source: str) -> "ImageTokenIds":
        """The ids of the six image tokens in a ``tokenizers.Tokenizer``; MoecError naming the missing ones."""
        ids = {name: tokenizer.token_to_id(name) for name in IMAGE_TOKENS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise MoecError(f"{source} has no {', '.join(missing)} token(s): it is not a Llama 4 multimodal "
                            "tokenizer; use the checkpoint's own tokenizer.json")
        return cls(*(ids[name] for name in IMAGE_TOKENS))


def patches_per_tile(tile_size: int, patch_size: int, pixel_shuffle_ratio: float) -> int:
    """<|patch|> tokens per tile: the vision tower's patches after pixel shuffle (ratio 0.5: 4 patches -> 1)."""
    downsample = int(round(1.0 / pixel_shuffle_ratio**2))
    return (tile_size // patch_size) ** 2 // downsample


def image_token_layout(tiles_hw: tuple[int, int], per_tile: int, ids: ImageTokenIds) -> list[int]:
    """The token ids that stand for one image of ``tiles_hw`` tiles (the processor's _prompt_split_image)."""
    rows, cols = tiles_hw
    out = [ids.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                out += [ids.patch] * per_tile
                if col < cols - 1:
                    out.append(ids.tile_x_separator)
            out.append(ids.tile_y_separator)
    out += [ids.image] + [ids.patch] * per_tile + [ids.image_end]
    return out


def expand_image_slots(prompt_ids: Sequence[int], tiles_hw: Sequence[tuple[int, int]], per_tile: int,
                       ids: ImageTokenIds, bos_id: int | None = None) -> list[int]:
    """``prompt_ids`` with its i-th ``<|image|>`` replaced by image i's layout. A prompt without any ``<|image|>``
    gets the images in front of its text, after a leading ``bos_id`` (where the chat template puts image items
    listed before the text); otherwise the number of slots must equal the number of images."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not tiles_hw:
        return prompt_ids
    slots = [i for i, t in enumerate(prompt_ids) if t == ids.image]
    if not slots:
        front = 1 if bos_id is not None and prompt_ids[:1] == [bos_id] else 0
        prompt_ids = prompt_ids[:front] + [ids.image] * len(tiles_hw) + prompt_ids[front:]
        slots = list(range(front, front + len(tiles_hw)))
    if len(slots) != len(tiles_hw):
        raise MoecError(f"the prompt has {len(slots)} {IMAGE} slot(s) but {len(tiles_hw)} image(s) were given; "
                        f"write one {IMAGE} where each image goes, or none to put all images first")
    out, start = [], 0
    for slot, hw in zip(slots, tiles_hw):
        out += prompt_ids[start:slot] + image_token_layout(hw, per_tile, ids)
        start = slot + 1
    return out + prompt_ids[start:]


def merge_image_features(embeds_BSH: torch.Tensor, input_ids_BS: torch.Tensor, features_NH: torch.Tensor,
                         patch_id: int) -> torch.Tensor:
    """``embeds_BSH`` with row n of ``features_NH`` at the n-th ``<|patch|>`` position (row-major over B, S), as
    transformers' masked_scatter; MoecError when the counts differ (a prompt laid out for other images)."""
    count = int((input_ids_BS == patch_id).sum())
    if count != features_NH.shape[0]:
        raise MoecError(f"the prompt has {count} {PATCH} tokens but the images give {features_NH.shape[0]} "
                        "feature rows; lay the prompt out with expand_image_slots for the same images")
    return place_image_features(embeds_BSH, input_ids_BS, features_NH, patch_id)


def place_image_features(embeds_BSH: torch.Tensor, input_ids_BS: torch.Tensor, features_NH: torch.Tensor,
                         patch_id: int) -> torch.Tensor:
    """The merge without the count check, in ops whose shapes do not depend on the data (CumSum, Gather, Where),
    so the exported text graph carries it; N may be 0 (decode steps, text-only prompts)."""
    mask_BS = input_ids_BS == patch_id
    rank_BS = torch.cumsum(mask_BS.reshape(-1).to(torch.int64), dim=0).reshape(mask_BS.shape) - 1
    # Positions that are not <|patch|> (and any beyond N) read the zero row appended at index N.
    padded_NH = torch.cat([features_NH.to(embeds_BSH.dtype), embeds_BSH.new_zeros(1, embeds_BSH.shape[-1])])
    index_BS = torch.where(mask_BS, rank_BS.clamp(max=features_NH.shape[0]), features_NH.shape[0])
    return torch.where(mask_BS[..., None], padded_NH[index_BS], embeds_BSH)
