"""A deterministic random Llama 4 checkpoint in Hugging Face layout, with a byte-level tokenizer.

It is the embedded default input of the main job and of every stage's tests: same seed, same
bytes. Weights are drawn so activations stay O(1) through the layers (fan-in scaled normals), which
keeps routing decisions and logits varied enough that a numerical bug shows up as a real difference.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from moec.common import demo_note
from moec.common.artifacts import atomic_dir, check_output_dir
from moec.common.contract import TOKENIZER_FILE
from moec.common.errors import MoecError
from moec.models.checkpoint import CONFIG_FILE, INDEX_FILE, TEXT_PREFIX, WEIGHTS_FILE
from moec.models.config import CAUSAL_LM, CONDITIONAL_GENERATION, Llama4Config
from moec.models.llama4 import Llama4ForCausalLM

LAYOUTS = {"causal_lm": CAUSAL_LM, "conditional_generation": CONDITIONAL_GENERATION}
# Random weights for the full-size presets would be hundreds of GB; refuse above this.
MAX_DEMO_PARAMS = 500_000_000
# Written into every demo checkpoint, for the person who finds the folder. What lets a new demo
# replace the folder (and never a real checkpoint, which also has a config.json) is the marker
# moec.common.artifacts writes, naming the command.
DEMO_MARKER = demo_note.DEMO_MARKER

# Byte-level tokenizer: ids 0..255 are the bytes themselves, then these special tokens.
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, EOT, PAD, "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>")
DEMO_BOS_ID = 256
DEMO_EOS_IDS = (257, 258)
DEMO_PAD_ID = 259
DEMO_TOKENIZER_VOCAB = 256 + len(SPECIAL_TOKENS)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which tokenizers' ByteLevel pre-tokenizer uses.

    tokenizers exposes the alphabet only as an unordered set; the table is needed to give byte b
    the id b, so it is written out here.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(image_tokens: bool = False):
    """A byte-level BPE tokenizer (no merges): every byte is one token, BOS prepended. ``image_tokens``: the six
    Llama 4 image tokens follow the special tokens (ids 264-269), for a demo with a vision tower."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, DEMO_BOS_ID)]
    )
    assert tok.token_to_id(BOS) == DEMO_BOS_ID and tok.get_vocab_size() == DEMO_TOKENIZER_VOCAB
    if image_tokens:
        from moec.models.image_prompt import IMAGE_TOKENS

        tok.add_special_tokens(list(IMAGE_TOKENS))
    return tok


def demo_config(preset: str | Llama4Config) -> Llama4Config:
    """The preset with the demo tokenizer's special-token ids."""
    config = Llama4Config.preset(preset) if isinstance(preset, str) else preset
    if config.vocab_size < DEMO_TOKENIZER_VOCAB:
        raise MoecError(
            f"vocab_size {config.vocab_size} is smaller than the demo tokenizer's {DEMO_TOKENIZER_VOCAB} tokens"
        )
    if (config.bos_token_id, config.eos_token_ids, config.pad_token_id) != (DEMO_BOS_ID, DEMO_EOS_IDS, DEMO_PAD_ID):
        config = config.replace(bos_token_id=DEMO_BOS_ID, eos_token_ids=DEMO_EOS_IDS, pad_token_id=DEMO_PAD_ID)
    return config


def random_state_dict(config: Llama4Config, seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights for every tensor of the text model, in HF key names, drawn in a fixed order."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Llama4ForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    n_params = sum(math.prod(s) for s in shapes.values())
    if n_params > MAX_DEMO_PARAMS:
        raise MoecError(
            f"a random checkpoint of this config has {n_params / 1e9:.1f}B parameters; demo checkpoints are "
            f"for small configs such as llama4-tiny (use a real checkpoint for full-size models)"
        )
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(shape, generator=gen)
        else:
            # Linear weights [out, in] and stacked experts [E, in, out]: scale by the input width.
            fan_in = shape[-2] if name.endswith(("gate_up_proj", "experts.down_proj")) else shape[-1]
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        state[name] = t.contiguous()
    return state


def _split_shards(names: list[str], shards: int) -> list[list[str]]:
    """Consecutive groups of about equal tensor count (every shard non-empty)."""
    n = len(names)
    return [names[i * n // shards : (i + 1) * n // shards] for i in range(shards)]


def write_demo_checkpoint(
    out_dir: str | Path,
    preset: str | Llama4Config = "llama4-tiny",
    seed: int = 0,
    shards: int = 1,
    layout: str = "causal_lm",
    vision: bool = False,
) -> Path:
    """Write config.json, model.safetensors (or ``shards`` files + index) and tokenizer.json.

    ``vision`` (conditional_generation only): also a tiny random vision tower (models/demo_vision.py), the image
    tokens in the tokenizer (the vocabulary grows to hold them), preprocessor_config.json and a picture to prompt
    with (demo-image.png).

    The folder appears complete or not at all; an existing checkpoint folder is replaced.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if layout not in LAYOUTS:
        raise MoecError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if vision and layout != "conditional_generation":
        raise MoecError("a demo vision tower needs --layout conditional_generation (Llama4ForConditionalGeneration)")
    check_output_dir(out, command="demo-checkpoint")
    config = demo_config(preset)
    tokenizer = build_tokenizer(image_tokens=vision)
    if vision and config.vocab_size < tokenizer.get_vocab_size():
        config = config.replace(vocab_size=tokenizer.get_vocab_size())
    state = random_state_dict(config, seed)
    if not 1 <= shards <= len(state):
        raise MoecError(f"shards must be between 1 and {len(state)} (the number of tensors), got {shards}")
    prefix = TEXT_PREFIX[layout]
    state = {prefix + k: v for k, v in state.items()}
    hf_config = config.to_hf_config(LAYOUTS[layout])
    if vision:
        from moec.models.demo_vision import DEMO_VISION_CONFIG, random_vision_state
        from moec.models.image_prompt import IMAGE_END, IMAGE_START, PATCH

        state |= random_vision_state(config.hidden_size, seed)
        hf_config |= {"vision_config": DEMO_VISION_CONFIG, "image_token_index": tokenizer.token_to_id(PATCH),
                      "boi_token_index": tokenizer.token_to_id(IMAGE_START),
                      "eoi_token_index": tokenizer.token_to_id(IMAGE_END)}

    with atomic_dir(out, command="demo-checkpoint") as tmp:
        (tmp / DEMO_MARKER).write_text(f"random weights written by `moec demo-checkpoint` (seed {seed}); "
                                       "moec may replace this folder with a new demo checkpoint\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        if vision:
            from moec.models.demo_vision import demo_preprocessor_config
            from moec.models.image_processing import PREPROCESSOR_FILE

            (tmp / PREPROCESSOR_FILE).write_text(json.dumps(demo_preprocessor_config(), indent=2) + "\n")
            from moec.models.demo_vision import DEMO_IMAGE_FILE, write_demo_image

            write_demo_image(tmp / DEMO_IMAGE_FILE)  # for `moec run ... --image DIR/demo-image.png`
        if shards == 1:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(_split_shards(sorted(state), shards)):
                file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                save_file({n: state[n] for n in names}, str(tmp / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, file))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _apply_umask(tmp)
    return out


def _apply_umask(folder: Path) -> None:
    """The temporary folder (mkdtemp) and safetensors files are created owner-only; give the
    finished checkpoint the permissions an ordinary mkdir/open would (a server may run as
    another user)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)
