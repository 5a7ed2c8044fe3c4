"""The named model presets: the embedded demo (``llama4-tiny``) and Scout's and Maverick's real
config.json values, parsed by the same code as a checkpoint's config.json."""

from __future__ import annotations

from typing import Any

from moec.models.config import TEXT_MODEL_TYPE, Llama4Config


def _preset(**fields: Any) -> dict[str, Any]:
    return {"model_type": TEXT_MODEL_TYPE, **fields}


# Byte-level demo tokenizer: 256 byte tokens, then the special tokens (see models/demo.py).
TINY_VOCAB_SIZE = 264


# The presets as transformers-style config dicts (what a config.json of that model says).
PRESET_SOURCES: dict[str, dict[str, Any]] = {
    # Small enough to run in milliseconds on a CPU, but with every feature switched on: a NoPE
    # layer (index 3) with temperature tuning that kicks in at position 7, chunked attention with
    # chunks of 8 (tests cross them), dense (0, 2) and MoE (1, 3) layers, GQA, llama3 RoPE.
    "llama4-tiny": _preset(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=4,
        attention_chunk_size=8,
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=8,
        attn_scale=0.1,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=[257, 258],
        pad_token_id=259,
    ),
    # meta-llama/Llama-4-Scout-17B-16E(-Instruct) text_config.
    "llama4-scout": _preset(
        vocab_size=202048,
        hidden_size=5120,
        intermediate_size=8192,
        intermediate_size_mlp=16384,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        num_local_experts=16,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        no_rope_layer_interval=4,
        attention_chunk_size=8192,
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=8192,
        attn_scale=0.1,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=10485760,
        tie_word_embeddings=False,
        bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008],
        pad_token_id=200018,
    ),
    # meta-llama/Llama-4-Maverick-17B-128E(-Instruct) text_config: MoE every other layer, no QK norm.
    "llama4-maverick": _preset(
        vocab_size=202048,
        hidden_size=5120,
        intermediate_size=8192,
        intermediate_size_mlp=16384,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        num_local_experts=128,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=4,
        attention_chunk_size=8192,
        use_qk_norm=False,
        attn_temperature_tuning=True,
        floor_scale=8192,
        attn_scale=0.1,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        max_position_embeddings=1048576,
        tie_word_embeddings=False,
        bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008],
        pad_token_id=200018,
    ),
}


# Presets go through the same parser as config.json, so they get the same derivations.
PRESETS: dict[str, Llama4Config] = {
    name: Llama4Config.from_hf_dict(src, source=f"preset {name}") for name, src in PRESET_SOURCES.items()
}
