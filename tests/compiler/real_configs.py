"""The real Llama 4 Scout and Maverick config.json files (../shared/llama4-configs), and the same
files shrunk to test size: every field kept, only hidden/intermediate sizes and the layer counts
made small (the README there says which sizes may change); vocabulary, heads, head_dim, chunk,
positions and token ids stay the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# ../shared/llama4-configs beside the checkout (main checkouts and worktrees sit at different depths).
CONFIG_DIR = next((p / "shared" / "llama4-configs" for p in Path(__file__).resolve().parents
                   if (p / "shared" / "llama4-configs").is_dir()), Path("shared") / "llama4-configs")
REAL = {
    "scout": CONFIG_DIR / "Llama-4-Scout-17B-16E-Instruct.config.json",
    "maverick": CONFIG_DIR / "Llama-4-Maverick-17B-128E-Instruct.config.json",
}
# Four layers: Maverick alternates dense and MoE layers and every fourth layer is NoPE, so both
# kinds of each appear; Scout's every layer is MoE.
SHRUNK_TEXT = {"hidden_size": 16, "intermediate_size": 8, "intermediate_size_mlp": 16, "num_hidden_layers": 4}


def real_config_path(name: str) -> Path:
    path = REAL[name]
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    return path


def shrunk_config_dict(name: str) -> dict:
    d = json.loads(real_config_path(name).read_text())
    d["text_config"].update(SHRUNK_TEXT)
    d["vision_config"]["num_hidden_layers"] = 1
    if d["text_config"].get("layer_types"):
        d["text_config"]["layer_types"] = d["text_config"]["layer_types"][: SHRUNK_TEXT["num_hidden_layers"]]
    return d


def write_shrunk_checkpoint(name: str, out: Path, dtype: str = "bf16", seed: int = 0) -> Path:
    """A checkpoint of the shrunk real config: its config.json as written above, random weights
    under the real tensor names (Llama4ForConditionalGeneration's ``language_model.`` prefix), no
    tokenizer, stored in ``dtype`` like the real bf16 release."""
    import torch
    from safetensors.torch import save_file

    from moec.models import Llama4Config
    from moec.models.checkpoint import TEXT_PREFIX
    from moec.models.demo import random_state_dict

    d = shrunk_config_dict(name)
    cfg = Llama4Config.from_hf_dict(d)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    prefix = TEXT_PREFIX["conditional_generation"]
    state = {prefix + k: v.to(torch_dtype) for k, v in random_state_dict(cfg, seed).items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
