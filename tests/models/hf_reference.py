"""Builders for the transformers reference (imported by tests/models as ``hf_reference``): tiny random Llama4ForCausalLM models saved with
``save_pretrained``, which moec must load through its own loader and match."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=16,
    intermediate_size_mlp=24,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    attention_chunk_size=4,
    no_rope_layer_interval=2,  # layers 1 and 3 are NoPE
    floor_scale=4,  # temperature tuning changes q from position 3 on
    attn_scale=0.1,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations (transformers' init is std 0.02, which makes every logit ~0
    and hides errors): fan-in scaled normals, norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("gate_up_proj", "experts.down_proj")):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-2]))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def make_hf_model(seed: int = 0, **overrides):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    fields = {**BASE, **overrides}
    torch.manual_seed(seed)
    config = Llama4TextConfig(**fields)
    config._attn_implementation = "eager"
    model = Llama4ForCausalLM(config).eval()
    randomize_(model, seed)
    return model


def save_hf(model, out: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out


def to_conditional_generation(src: Path, out: Path, extra_vision: bool = True) -> Path:
    """Rewrite a saved Llama4ForCausalLM as a Llama4ForConditionalGeneration checkpoint (text
    weights under ``language_model.``, config under ``text_config``, plus vision-tower tensors)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    text_config = json.loads((src / "config.json").read_text())
    text_config.pop("architectures", None)
    config = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text_config,
        "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 8},
    }
    (out / "config.json").write_text(json.dumps(config))
    tensors = {"language_model." + k: v for k, v in load_file(src / "model.safetensors").items()}
    if extra_vision:
        tensors["vision_model.patch_embedding.linear.weight"] = torch.ones(8, 12)
        tensors["multi_modal_projector.linear_1.weight"] = torch.ones(text_config["hidden_size"], 8)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


TINY_VISION = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    vision_output_dim=16,
    image_size=28,
    patch_size=14,
    projector_input_dim=16,
    projector_output_dim=16,
)


def make_hf_conditional_generation(seed: int = 0, **text_overrides):
    """transformers' own multimodal Llama4ForConditionalGeneration with a one-layer vision tower."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    config = Llama4Config(text_config={**BASE, **text_overrides}, vision_config=TINY_VISION)
    config.text_config._attn_implementation = "eager"
    model = Llama4ForConditionalGeneration(config).eval()
    randomize_(model.language_model, seed)
    return model
