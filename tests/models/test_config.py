"""Llama4Config: reading config.json in both layouts and both RoPE spellings, derivations, presets,
and every malformed field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.common.errors import MoecError
from moec.models import PRESETS, Llama4Config
from moec.models.config import PRESET_SOURCES

# Meta's released Llama-4-Scout text_config as shipped (transformers 4.x spelling: rope_scaling,
# attn_temperature_tuning written as 4, moe_layers/no_rope_layers left to the defaults).
SCOUT_4X = {
    "architectures": ["Llama4ForConditionalGeneration"],
    "model_type": "llama4",
    "text_config": {
        "model_type": "llama4_text",
        "attention_chunk_size": 8192,
        "attn_temperature_tuning": 4,
        "attn_scale": 0.1,
        "floor_scale": 8192,
        "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008],
        "pad_token_id": 200018,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "interleave_moe_layer_step": 1,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760,
        "no_rope_layers": [],
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 16.0,
            "high_freq_factor": 1.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "use_qk_norm": True,
        "vocab_size": 202048,
    },
    "vision_config": {"hidden_size": 1408},
}


def test_released_scout_config_equals_preset():
    assert Llama4Config.from_hf_dict(SCOUT_4X) == PRESETS["llama4-scout"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_round_trips(name, tmp_path):
    config = PRESETS[name]
    assert Llama4Config.from_hf_dict(config.to_dict()) == config
    for arch in ("Llama4ForCausalLM", "Llama4ForConditionalGeneration"):
        (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config(arch)))
        assert Llama4Config.from_pretrained(tmp_path) == config


def test_tiny_preset_has_every_feature():
    c = PRESETS["llama4-tiny"]
    assert c.moe_layer_indices() == (1, 3)
    assert [c.uses_rope(i) for i in range(4)] == [True, True, True, False]
    assert c.uses_chunked_attention(0) and not c.uses_chunked_attention(3)
    assert c.attention_chunk_size == 8 and c.use_qk_norm and c.attn_temperature_tuning
    assert c.rope_parameters.rope_type == "llama3" and c.num_key_value_groups == 2
    assert c.eos_token_id == 257


def test_maverick_preset():
    c = PRESETS["llama4-maverick"]
    assert c.num_local_experts == 128 and c.moe_layer_indices() == tuple(range(1, 48, 2))
    assert not c.use_qk_norm and c.rope_parameters.rope_type == "default"


def test_unknown_preset():
    with pytest.raises(MoecError, match="unknown model preset 'llama5'.*llama4-tiny"):
        Llama4Config.preset("llama5")


def test_replace_rederives_layers():
    c = PRESETS["llama4-tiny"].replace(num_hidden_layers=8)
    assert c.moe_layer_indices() == (1, 3, 5, 7) and c.no_rope_layers == (1, 1, 1, 0, 1, 1, 1, 0)


@given(
    layers=st.integers(1, 12),
    step=st.integers(1, 4),
    interval=st.integers(1, 5),
    chunk=st.one_of(st.none(), st.integers(1, 64)),
)
@settings(max_examples=60, deadline=None)
def test_derived_layer_lists_match_transformers(layers, step, interval, chunk):
    from transformers import Llama4TextConfig

    fields = {**PRESET_SOURCES["llama4-tiny"], "num_hidden_layers": layers, "interleave_moe_layer_step": step,
              "no_rope_layer_interval": interval, "attention_chunk_size": chunk}
    fields.pop("model_type")
    ours = Llama4Config.from_hf_dict({"model_type": "llama4_text", **fields})
    ref = Llama4TextConfig(**fields)
    assert list(ours.moe_layers) == ref.moe_layers
    assert list(ours.no_rope_layers) == ref.no_rope_layers
    assert list(ours.layer_types) == ref.layer_types


def _tiny(**changes):
    d = {**PRESET_SOURCES["llama4-tiny"], "architectures": ["Llama4ForCausalLM"]}
    for k, v in changes.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "unsupported architecture LlamaForCausalLM"),
        ({"architectures": ..., "model_type": "mixtral"}, "cannot tell the model type"),
        ({"hidden_size": ...}, "missing field 'hidden_size'"),
        ({"num_local_experts": ...}, "missing field 'num_local_experts'"),
        ({"hidden_size": "64"}, "'hidden_size' must be an integer"),
        ({"num_hidden_layers": 0}, "'num_hidden_layers' must be >= 1"),
        ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
        ({"num_experts_per_tok": 5}, r"num_experts_per_tok \(5\) exceeds num_local_experts \(4\)"),
        ({"moe_layers": [1, 4]}, r"moe_layers \[1, 4\] must be distinct layer indices in \[0, 4\)"),
        ({"no_rope_layers": [1, 1, 0]}, "no_rope_layers must hold at least 4 entries"),
        ({"no_rope_layers": [1, 2, 1, 0]}, "no_rope_layers must hold"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types must list 4 entries"),
        ({"attention_chunk_size": None, "layer_types": ["chunked_attention"] * 4}, "attention_chunk_size is null"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "unsupported rope_type 'yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, r"'factor' must be a finite number"),
        ({"rope_parameters": {**PRESET_SOURCES["llama4-tiny"]["rope_parameters"], "low_freq_factor": 0}},
         "'low_freq_factor' must be positive"),
        ({"eos_token_id": [257, 9999]}, r"eos_token_id must be token ids in \[0, 264\)"),
        ({"bos_token_id": -1}, "'bos_token_id' must be a token id"),
        ({"rms_norm_eps": 0}, "rms_norm_eps must be positive"),
        ({"use_qk_norm": "yes"}, "'use_qk_norm' must be true or false"),
        ({"head_dim": 15}, "head_dim must be even"),
    ],
)
def test_malformed_config(changes, match, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_tiny(**changes)))
    with pytest.raises(MoecError, match=match) as info:
        Llama4Config.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_conditional_generation_needs_text_config():
    with pytest.raises(MoecError, match="needs a 'text_config' object"):
        Llama4Config.from_hf_dict({"architectures": ["Llama4ForConditionalGeneration"]})


def test_integral_floats_and_null_defaults_read_like_transformers():
    c = Llama4Config.from_hf_dict(_tiny(hidden_size=64.0, num_key_value_heads=None, head_dim=None))
    assert c.hidden_size == 64 and c.num_key_value_heads == 4 and c.head_dim == 16
