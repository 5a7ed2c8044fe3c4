"""``--moe-lowering split`` runs quantized experts as MatMulNBits, int4 only: an int8 / fp8 experts
request is refused up front, naming the lowering (those keep the target's default: QMoE, hybrid);
``--quantize-activations dynamic`` is refused where nothing computes int8 activations."""

from __future__ import annotations

import pytest

from moec.common.errors import MoecError
from moec.compiler.pipeline import OptimizeConfig
from moec.compiler.quantize_stage import check_quantize_request
from moec.passes.targets import parse_target


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_split_refuses_experts_that_are_not_int4(fmt):
    config = OptimizeConfig(target="ort", moe_lowering="split", quantize=fmt)
    with pytest.raises(MoecError, match="--moe-lowering split runs quantized experts as MatMulNBits, int4 only"):
        check_quantize_request(config, parse_target("ort"))


def test_split_takes_int4_experts_and_int8_activations():
    for extra in ({}, {"quantize_activations": "dynamic"}):
        config = OptimizeConfig(target="ort", moe_lowering="split", quantize="int4", **extra)
        assert check_quantize_request(config, parse_target("ort")).format == "int4"


def test_default_lowering_takes_quantized_experts():
    assert check_quantize_request(OptimizeConfig(target="ort", quantize="int8"), parse_target("ort")) is not None


@pytest.mark.parametrize("target", ["trt-rtx:sm89", "trt:sm90"])
def test_int8_activations_are_onnx_runtime_only(target):
    config = OptimizeConfig(target=target, quantize="int4", quantize_activations="dynamic")
    with pytest.raises(MoecError, match=f"target {target} runs int4 weights with float activations"):
        check_quantize_request(config, parse_target(target))
