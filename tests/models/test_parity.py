"""moec's Llama 4 against transformers' Llama4ForCausalLM, weights loaded through moec's loader
from directories written by save_pretrained. fp32, max |logit difference| <= 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from moec.models import Llama4Config, load_pretrained
from moec.models.llama4 import rope_inv_freq

from hf_reference import (
    LLAMA3_ROPE,
    make_hf_conditional_generation,
    make_hf_model,
    save_hf,
    to_conditional_generation,
)

TOL = 1e-4
SEQ = 11  # > 2 attention chunks of 4, and past the temperature-tuning floor_scale of 4

# Each case switches features against the base (tests/models/conftest.py BASE); together they
# cover: llama3 vs default RoPE, QK norm on/off, MoE every layer / every other layer / listed,
# k = 1 and 2, NoPE layers with and without temperature tuning, no chunking, tied lm_head,
# attention bias, sharded and unsharded files.
CASES = {
    "llama3-qknorm-k1-step1": dict(rope_parameters=LLAMA3_ROPE),
    "default-rope-noqk-k2-step2-sharded": dict(
        use_qk_norm=False, num_experts_per_tok=2, interleave_moe_layer_step=2, _shard="3KB"
    ),
    "scout-like-k1-step1-no-tuning": dict(
        rope_parameters={**LLAMA3_ROPE, "high_freq_factor": 1.0},  # low == high, as Scout ships
        attn_temperature_tuning=False,
        no_rope_layer_interval=4,
        num_key_value_heads=1,
    ),
    "maverick-like-tied-moe-listed": dict(
        use_qk_norm=False,
        moe_layers=[0, 3],
        num_experts_per_tok=2,
        tie_word_embeddings=True,
        _shard="4KB",
    ),
    "full-attention-bias": dict(attention_chunk_size=None, attention_bias=True, num_key_value_heads=4),
}


def _build(name: str, tmp_path):
    overrides = dict(CASES[name])
    shard = overrides.pop("_shard", None)
    hf = make_hf_model(seed=sum(map(ord, name)), **overrides)
    path = save_hf(hf, tmp_path / name, max_shard_size=shard)
    return hf, path


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_path):
    hf, path = _build(name, tmp_path)
    if "_shard" in CASES[name]:
        assert (path / "model.safetensors.index.json").is_file(), "case meant to be sharded"
        assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    model = load_pretrained(path)
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        out, present = model(ids)
    assert ref.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert (out - ref).abs().max().item() <= TOL
    assert len(present) == hf.config.num_hidden_layers
    for (k, _), (kind, slots) in zip(present, model.cache_kinds()):
        assert k.shape == (2, hf.config.num_key_value_heads, slots if kind == "chunked" else SEQ, hf.config.head_dim)


def test_routing_really_uses_several_experts(hf_ckpt):
    """Guard against a parity test that passes because one expert wins everywhere."""
    hf, path = hf_ckpt
    model = load_pretrained(path)
    moe = model.model.layers[0].feed_forward
    x = torch.randn(64, hf.config.hidden_size, generator=torch.Generator().manual_seed(3))
    chosen = moe.router(x).argmax(-1)
    assert len(set(chosen.tolist())) >= 3


def test_conditional_generation_layout_matches(hf_ckpt, tmp_path, caplog):
    hf, path = hf_ckpt
    cg = to_conditional_generation(path, tmp_path / "cg")
    with caplog.at_level("WARNING", logger="moec.models.checkpoint"):
        model = load_pretrained(cg)
    assert "leaves out 2 vision/projector tensor(s)" in caplog.text
    ids = torch.arange(3, 3 + SEQ)[None]
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= TOL


def test_transformers_conditional_generation_checkpoint(tmp_path, caplog):
    """A checkpoint written by transformers' own Llama4ForConditionalGeneration (vision tower,
    projector, text_config), sharded: moec loads the text model and matches it."""
    hf = make_hf_conditional_generation(seed=5, rope_parameters=LLAMA3_ROPE, num_experts_per_tok=2)
    path = save_hf(hf, tmp_path / "cg", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    with caplog.at_level("WARNING", logger="moec.models.checkpoint"):
        model = load_pretrained(path)
    assert "vision/projector tensor(s)" in caplog.text
    ids = torch.arange(7, 7 + SEQ)[None]
    with torch.no_grad():
        ref = hf.language_model(ids).logits
        assert ref.abs().max() > 1.0
        assert (model(ids)[0] - ref).abs().max().item() <= TOL


def test_greedy_generation_matches_transformers_generate(hf_ckpt):
    """transformers' generate (its own chunked sliding cache) and moec's KV-cache decode loop
    pick the same greedy tokens across several chunk boundaries."""
    hf, path = hf_ckpt
    model = load_pretrained(path)
    prompt = torch.tensor([[1, 17, 33, 5, 60]])
    new = 3 * hf.config.attention_chunk_size
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        logits, past = model(prompt)
        tokens = [logits[:, -1].argmax(-1)]
        for _ in range(new - 1):
            logits, past = model(tokens[-1][:, None], past_key_values=past)
            tokens.append(logits[:, -1].argmax(-1))
    assert torch.cat(tokens).tolist() == ref[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("preset", ["llama4-tiny", "llama4-scout", "llama4-maverick"])
def test_rope_frequencies_match_transformers(preset):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    config = Llama4Config.preset(preset)
    hf_config = Llama4TextConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    ref = Llama4TextRotaryEmbedding(hf_config)
    ours = rope_inv_freq(config.rope_parameters, config.head_dim)
    assert ref.attention_scaling == 1.0
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, ref.inv_freq)


@pytest.mark.parametrize("preset", ["llama4-tiny", "llama4-scout", "llama4-maverick"])
def test_presets_read_like_transformers(preset):
    """The layer lists derived from each preset are the ones transformers derives."""
    from transformers import Llama4TextConfig

    from moec.models.config import PRESET_SOURCES

    config = Llama4Config.preset(preset)
    hf = Llama4TextConfig(**{k: v for k, v in PRESET_SOURCES[preset].items() if k != "model_type"})
    assert list(config.moe_layers) == hf.moe_layers
    assert list(config.no_rope_layers) == hf.no_rope_layers
    assert list(config.layer_types) == hf.layer_types
