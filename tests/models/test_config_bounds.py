"""A config.json whose sizes no machine can hold is refused when it is read, naming the field,
instead of overflowing an allocation or building a million layers (issue 11)."""

from __future__ import annotations

import json

import pytest

from moec.common.errors import MoecError
from moec.models import Llama4Config
from moec.models.config import PRESET_SOURCES
from moec_cli import run_cli


def tiny(**changes):
    d = dict(PRESET_SOURCES["llama4-tiny"])
    for k in ("moe_layers", "no_rope_layers", "layer_types"):
        d.pop(k, None)  # derived from num_hidden_layers
    d.update(changes)
    return d


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 2**40), ("vocab_size", 2**40), ("intermediate_size", 2**40), ("num_local_experts", 2**40),
    ("intermediate_size_mlp", 2**40), ("max_position_embeddings", 2**40), ("num_hidden_layers", 10**6),
])
def test_a_size_no_machine_holds_is_named(field, value):
    with pytest.raises(MoecError, match=f"field '{field}'"):
        Llama4Config.from_hf_dict(tiny(**{field: value}), source="config.json")


def test_real_configs_and_presets_are_within_the_bounds():
    from pathlib import Path

    for f in sorted(Path(__file__).parents[3].glob("shared/llama4-configs/*.json")):
        Llama4Config.from_pretrained(f)
    Llama4Config.from_hf_dict(tiny(num_hidden_layers=1024, max_position_embeddings=10_485_760))


def test_the_cli_names_the_field_fast(tmp_path, demo_ckpt, capsys):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(demo_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**6
    for k in ("moe_layers", "no_rope_layers", "layer_types"):
        cfg.pop(k, None)
    (ck / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["run", ck, "--prompt-ids", "1 2"], capsys)
    assert code == 2 and "field 'num_hidden_layers'" in err and "Traceback" not in err
