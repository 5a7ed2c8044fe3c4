"""The shared sidecar reader: one validation for the passes, the build stage and the runtimes."""

from __future__ import annotations

import json

import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.common.sidecar import read_sidecar

GOOD = {
    "model_config": {"hidden_size": 64},
    "num_layers": 4,
    "moe_layers": [1, 3],
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 264,
    "max_positions": 512,
    "max_batch": 8,
    "generation": {"eos_token_ids": [257, 258]},
}


def _write(tmp_path, meta) -> object:
    onnx_path = tmp_path / "model.onnx"
    contract.sidecar_path(onnx_path).write_text(json.dumps(meta) if not isinstance(meta, str) else meta)
    return onnx_path


def test_reads_a_valid_sidecar(tmp_path):
    assert read_sidecar(_write(tmp_path, GOOD))["max_positions"] == 512


def test_missing_sidecar_is_an_error_only_when_required(tmp_path):
    with pytest.raises(MoecError, match="is not a moec export"):
        read_sidecar(tmp_path / "model.onnx")
    assert read_sidecar(tmp_path / "model.onnx", required=False) is None


@pytest.mark.parametrize(
    "change, field",
    [
        ({"max_positions": "lots"}, "max_positions"),
        ({"max_positions": True}, "max_positions"),
        ({"num_layers": 0}, "num_layers"),
        ({"max_batch": None}, "max_batch"),
        ({"model_config": None}, "model_config"),
        ({"moe_layers": [1, 7]}, "moe_layers"),
        ({"generation": {"eos_token_ids": [999]}}, "eos_token_ids"),
        ({"generation": "greedy"}, "generation"),
    ],
)
def test_wrong_field_is_named(tmp_path, change, field):
    with pytest.raises(MoecError, match=field) as e:
        read_sidecar(_write(tmp_path, {**GOOD, **change}))
    assert "model.moec.json" in str(e.value) and "re-export" in str(e.value)


def test_missing_field_and_broken_json(tmp_path):
    meta = dict(GOOD)
    del meta["vocab_size"]
    with pytest.raises(MoecError, match="lacks vocab_size"):
        read_sidecar(_write(tmp_path, meta))
    with pytest.raises(MoecError, match="model.moec.json is not valid JSON"):
        read_sidecar(_write(tmp_path, '{"num_layers": 4'))


def test_optional_fields_are_checked_when_present(tmp_path):
    meta = {k: v for k, v in GOOD.items() if k not in ("moe_layers", "head_dim", "num_key_value_heads")}
    assert read_sidecar(_write(tmp_path, meta))["num_layers"] == 4
    with pytest.raises(MoecError, match="head_dim"):
        read_sidecar(_write(tmp_path, {**meta, "head_dim": "16"}))
