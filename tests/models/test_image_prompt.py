"""The image tokens of a prompt against transformers 5.24's Llama4Processor, and the combined prompt (image
features merged into the text embeddings) against Llama4ForConditionalGeneration on a tiny random config.

transformers' forward raises AttributeError ('image_outputs') at its return in 5.24, so the reference is its own
body up to that line: get_image_features -> view(-1, dim) -> multi_modal_projector -> masked_scatter at the
image_token_id (<|patch|>) positions -> language_model(inputs_embeds=...)."""

import hashlib

import numpy as np
import pytest
import torch
from hf_image_reference import hf_image_processor_class
from hf_reference import BASE, randomize_

from moec.common.errors import MoecError
from moec.models.image_processing import ImageProcessingConfig, preprocess_image
from moec.models.image_prompt import (IMAGE, IMAGE_TOKENS, ImageTokenIds, expand_image_slots, image_token_layout,
                                      merge_image_features, patches_per_tile)

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

TILE = 56
PER_TILE = patches_per_tile(TILE, 14, 0.5)  # 16 patches, pixel shuffle 0.5 -> 4 tokens a tile


def _tokenizer():
    from moec.models.demo import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens(list(IMAGE_TOKENS))
    return tok


def _picture(height: int, width: int):
    """One picture at several sizes: images that differ only in size."""
    base = np.random.RandomState(3).randint(0, 256, (90, 120, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.BILINEAR)


def _hf_processor():
    image_processor = hf_image_processor_class()(size={"height": TILE, "width": TILE}, max_patches=4)
    from transformers import PreTrainedTokenizerFast  # after torchvision's import (hf_image_reference)
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    fast = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), bos_token="<|begin_of_text|>")
    return Llama4Processor(image_processor=image_processor, tokenizer=fast, patch_size=14, pixel_shuffle_ratio=0.5)


# Image sizes, the grids transformers' processor picks for them (tile 56, up to 4 tiles) and its prompt ids
# (length, digest), recorded from transformers 5.24: checked where torchvision is missing and the live
# comparison skips.
LAYOUTS = [
    ([(56, 56)], [(1, 1)], 20, "6d5749f003dcd207"),
    ([(40, 100)], [(1, 2)], 30, "5752901b8ba19a41"),
    ([(100, 40), (20, 20)], [(2, 1), (1, 1)], 42, "0a6b5cab61093a1b"),
    ([(112, 112), (56, 168), (30, 30)], [(2, 2), (1, 3), (1, 1)], 79, "0f271bd92e20bb33"),
]


def _moec_prompt(sizes):
    tok = _tokenizer()
    images = [_picture(*s) for s in sizes]
    text = "look: " + " and ".join([IMAGE] * len(images)) + " what?"
    tiles = [preprocess_image(im, ImageProcessingConfig(TILE, 4)).tiles_hw for im in images]
    ids = expand_image_slots(tok.encode(text).ids, tiles, PER_TILE, ImageTokenIds.from_tokenizer(tok, "test tokenizer"))
    return images, text, tiles, ids


@pytest.mark.parametrize("sizes,grids,length,digest", LAYOUTS)
def test_token_layout_equals_recorded_llama4_processor(sizes, grids, length, digest):
    _, _, tiles, got = _moec_prompt(sizes)
    assert tiles == grids
    assert (len(got), hashlib.sha256(str(got).encode()).hexdigest()[:16]) == (length, digest)


@pytest.mark.parametrize("sizes", [case[0] for case in LAYOUTS])
def test_token_layout_equals_llama4_processor(sizes):
    processor = _hf_processor()
    images, text, _, got = _moec_prompt(sizes)
    assert got == processor(images=images, text=text, return_tensors="pt")["input_ids"][0].tolist()


def test_layout_of_a_two_by_three_grid():
    ids = ImageTokenIds(*range(100, 106))  # start, end, image, patch, x, y
    layout = image_token_layout((2, 3), 2, ids)
    row = [103, 103, 104, 103, 103, 104, 103, 103, 105]
    assert layout == [100] + row + row + [102, 103, 103, 101]
    assert image_token_layout((1, 1), 2, ids) == [100, 102, 103, 103, 101]


def test_slots_must_match_the_images():
    ids = ImageTokenIds(*range(100, 106))
    # No slot: all images go first, after BOS.
    assert expand_image_slots([1, 7, 8], [(1, 1)], 1, ids, bos_id=1) == [1, 100, 102, 103, 101, 7, 8]
    with pytest.raises(MoecError, match="1 <\\|image\\|> slot\\(s\\) but 2 image"):
        expand_image_slots([1, 102, 7], [(1, 1), (1, 1)], 1, ids)
    with pytest.raises(MoecError, match="no <\\|image_start\\|>"):
        from moec.models.demo import build_tokenizer
        ImageTokenIds.from_tokenizer(build_tokenizer(), "the demo tokenizer")
    with pytest.raises(MoecError, match="3 <\\|patch\\|> tokens but the images give 2"):
        merge_image_features(torch.zeros(1, 4, 8), torch.tensor([[103, 103, 103, 5]]), torch.ones(2, 8), 103)


VISION = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": TILE, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 48,
          "projector_output_dim": 48, "vision_output_dim": 48, "rope_parameters": {"rope_theta": 10000.0}}


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """transformers' Llama4ForConditionalGeneration (random weights, saved) and the demo tokenizer's image ids."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    tok = _tokenizer()
    ids = ImageTokenIds.from_tokenizer(tok, "test tokenizer")
    text = {**BASE, "vocab_size": tok.get_vocab_size(), "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 259,
            "max_position_embeddings": 512, "attention_chunk_size": 16}
    torch.manual_seed(0)
    config = Llama4Config(text_config=text, vision_config=VISION, image_token_index=ids.patch)
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Llama4ForConditionalGeneration(config).eval()
    randomize_(model.language_model, 0)
    with torch.no_grad():  # post_init leaves some vision weights at zero/one; random ones test every path
        for p in list(model.vision_model.parameters()) + list(model.multi_modal_projector.parameters()):
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("mm")
    model.save_pretrained(path, safe_serialization=True)
    return model, path, tok, ids


def _reference_embeds(model, input_ids_BS, pixels_TCHW):
    embeds = model.get_input_embeddings()(input_ids_BS)
    features = model.get_image_features(pixel_values=pixels_TCHW, return_dict=True).last_hidden_state
    projected = model.multi_modal_projector(features.view(-1, features.size(-1))).to(embeds.dtype)
    mask = model.get_placeholder_mask(input_ids_BS, inputs_embeds=embeds, image_features=projected)
    return embeds.masked_scatter(mask, projected)


def test_combined_prompt_equals_transformers(multimodal):
    from moec.models.checkpoint import load_pretrained, load_vision_tower

    model, path, tok, ids = multimodal
    text_model, tower = load_pretrained(path), load_vision_tower(path)
    images = [preprocess_image(_picture(40, 100), ImageProcessingConfig(TILE, 4)),
              preprocess_image(_picture(30, 30), ImageProcessingConfig(TILE, 4))]
    assert [im.tiles_hw for im in images] == [(1, 2), (1, 1)]
    prompt = expand_image_slots(tok.encode("a " + IMAGE + " b " + IMAGE + " c").ids, [im.tiles_hw for im in images],
                                PER_TILE, ids)
    input_ids_BS = torch.tensor([prompt])
    pixels_TCHW = torch.cat([im.pixels_TCHW for im in images]).float()
    with torch.no_grad():
        expected_embeds = _reference_embeds(model, input_ids_BS, pixels_TCHW)
        expected_logits = model.language_model(inputs_embeds=expected_embeds).logits
        embeds = merge_image_features(text_model.model.embed_tokens(input_ids_BS), input_ids_BS, tower(pixels_TCHW),
                                      ids.patch)
        logits, past = text_model(input_ids_BS, inputs_embeds_BSH=embeds)
    torch.testing.assert_close(embeds, expected_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    # The image changes the answer: features that were not merged would be caught.
    with torch.no_grad():
        plain, _ = text_model(input_ids_BS)
    assert (plain[0, -1] - logits[0, -1]).abs().max() > 1e-2

    # Greedy, 16 steps: transformers re-runs the whole sequence each step; moec decodes on its cache.
    ref_embeds, ref_tokens, tokens = expected_embeds, [], []
    with torch.no_grad():
        for _ in range(16):
            nxt = int(model.language_model(inputs_embeds=ref_embeds).logits[0, -1].argmax())
            ref_tokens.append(nxt)
            ref_embeds = torch.cat([ref_embeds, model.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        nxt = int(logits[0, -1].argmax())
        for step in range(16):
            tokens.append(nxt)
            step_logits, past = text_model(torch.tensor([[nxt]]), past_key_values=past)
            nxt = int(step_logits[0, -1].argmax())
    assert tokens == ref_tokens
