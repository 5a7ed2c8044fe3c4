"""``--moe-lowering split`` reads float expert initializers: a quantized-experts request is refused
up front, naming the lowering (quantized experts keep the target's default, ort's QMoE)."""

from __future__ import annotations

import pytest

from moec.common.errors import MoecError
from moec.compiler.pipeline import OptimizeConfig
from moec.compiler.quantize_stage import check_quantize_request
from moec.passes.targets import parse_target


def test_split_refuses_quantized_experts():
    config = OptimizeConfig(target="ort", moe_lowering="split", quantize="int8")
    with pytest.raises(MoecError, match="--moe-lowering split runs per-expert float initializers"):
        check_quantize_request(config, parse_target("ort"))


def test_default_lowering_takes_quantized_experts():
    assert check_quantize_request(OptimizeConfig(target="ort", quantize="int8"), parse_target("ort")) is not None
