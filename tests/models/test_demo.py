"""The demo checkpoint: deterministic, loadable in every layout and sharding with the same logits,
written atomically, with a byte-level tokenizer that fits the model's vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from moec.common.errors import MoecError
from moec.models import Llama4Config, load_pretrained
from moec.models.demo import DEMO_TOKENIZER_VOCAB, write_demo_checkpoint

IDS = torch.tensor([[256, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110, 32, 102, 111, 120]])


def _logits(path):
    with torch.no_grad():
        return load_pretrained(path)(IDS)[0]


def test_same_seed_same_bytes_other_seed_other_weights(demo_ckpt, tmp_path):
    again = write_demo_checkpoint(tmp_path / "again", seed=0)
    other = write_demo_checkpoint(tmp_path / "other", seed=1)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (demo_ckpt / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (demo_ckpt / "model.safetensors").read_bytes()


@pytest.mark.parametrize("shards, layout", [(3, "causal_lm"), (1, "conditional_generation"), (2, "conditional_generation")])
def test_layouts_and_shards_give_identical_logits(demo_ckpt, tmp_path, shards, layout):
    path = write_demo_checkpoint(tmp_path / "ckpt", shards=shards, layout=layout)
    if shards > 1:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) == shards and all((path / f).is_file() for f in files)
        assert not (path / "model.safetensors").exists()
        if layout == "conditional_generation":
            assert all(k.startswith("language_model.") for k in index["weight_map"])
    config = json.loads((path / "config.json").read_text())
    expected_arch = "Llama4ForConditionalGeneration" if layout == "conditional_generation" else "Llama4ForCausalLM"
    assert config["architectures"] == [expected_arch]
    assert torch.equal(_logits(path), _logits(demo_ckpt))


def test_demo_checkpoint_loads_in_transformers(demo_ckpt):
    """The files are a genuine Hugging Face checkpoint: transformers reads them and agrees."""
    from transformers import Llama4ForCausalLM

    hf = Llama4ForCausalLM.from_pretrained(demo_ckpt, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(IDS).logits - _logits(demo_ckpt)).abs().max().item() <= 1e-4


def test_tokenizer_fits_the_model(demo_ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_ckpt / "tokenizer.json"))
    config = Llama4Config.from_pretrained(demo_ckpt)
    assert tok.get_vocab_size() == DEMO_TOKENIZER_VOCAB <= config.vocab_size
    text = "Hello, Wörld! 🦙"
    enc = tok.encode(text)
    assert enc.ids[0] == config.bos_token_id
    assert enc.ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(enc.ids) == text
    assert [tok.id_to_token(i) for i in config.eos_token_ids] == ["<|end_of_text|>", "<|eot|>"]
    assert tok.id_to_token(config.pad_token_id) == "<|pad|>"


def test_weights_are_fp32_and_o1(demo_ckpt):
    with safe_open(str(demo_ckpt / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.feed_forward.experts.gate_up_proj")
    assert w.dtype == torch.float32 and 0.05 < w.std().item() < 0.5


def test_overwrites_a_demo_checkpoint_but_not_other_folders(tmp_path):
    path = write_demo_checkpoint(tmp_path / "ckpt", shards=2)
    write_demo_checkpoint(path, shards=1)
    assert sorted(p.name for p in path.iterdir()) == [
        ".moec-output.json", "config.json", "model.safetensors", "moec-demo-checkpoint.txt", "tokenizer.json"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("x")
    with pytest.raises(MoecError, match="choose a new or empty folder"):
        write_demo_checkpoint(tmp_path / "mine")
    # A real checkpoint has a config.json too, but no marker: never overwritten with random weights.
    (path / ".moec-output.json").unlink()
    with pytest.raises(MoecError, match="choose a new or empty folder"):
        write_demo_checkpoint(path)
    assert (path / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shards=0), "shards must be between 1 and"),
        (dict(shards=10_000), "shards must be between 1 and"),
        (dict(layout="gguf"), "unknown layout 'gguf'"),
        (dict(preset="llama4-scout"), r"107\.8B parameters"),
        (dict(preset="llama5"), "unknown model preset"),
    ],
)
def test_bad_requests_leave_nothing(tmp_path, kwargs, match):
    with pytest.raises(MoecError, match=match):
        write_demo_checkpoint(tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path):
    from moec.compiler.cli import cli

    result = CliRunner().invoke(cli, ["demo-checkpoint", str(tmp_path / "c"), "--shards", "2", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors.index.json" in result.output
    assert torch.equal(_logits(tmp_path / "c"), _logits(write_demo_checkpoint(tmp_path / "d")))


def test_permissions_follow_umask(demo_ckpt):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(demo_ckpt.stat().st_mode) == 0o777 & ~umask
    for f in demo_ckpt.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
