"""The quantization options ``moec optimize`` and ``moec compile`` share (one definition, so the
two commands cannot drift). They fill the stage dataclasses' ``quantize*`` fields."""

from __future__ import annotations

import click

from moec.common.contract import INT4_GROUPS as GROUPS
from moec.common.contract import QUANT_ACTIVATIONS as ACTIVATIONS
from moec.common.contract import QUANT_METHODS as METHODS
from moec.common.contract import QUANT_FORMATS as FORMATS
from moec.common.contract import QUANT_SCOPES as SCOPES


def quantize_options(fn):
    for option in reversed([
        click.option("--quantize", type=click.Choice(list(FORMATS)), default=None,
                     help="Quantize weights: int4 (blockwise, weight-only), int8 (per output channel), fp8 "
                          "(E4M3, per output channel), nvfp4 (E2M1 in blocks of 16, E4M3 block scales, "
                          "fp32 global scale; TensorRT on sm100+ / TensorRT-RTX on sm120+). Routing stays full precision."),
        click.option("--quantize-group", type=click.Choice([str(g) for g in GROUPS]), default=None,
                     callback=lambda ctx, param, v: None if v is None else int(v),
                     help="int4 group size along K (default 128)."),
        click.option("--quantize-scope", type=click.Choice(list(SCOPES)), default="experts", show_default=True,
                     help="experts: routed experts; mlp: + shared expert and dense MLPs; all: + attention."),
        click.option("--quantize-asymmetric", "quantize_asymmetric", is_flag=True,
                     help="int4 with a zero point per group (default symmetric)."),
        click.option("--quantize-method", type=click.Choice(list(METHODS)), default="rtn", show_default=True,
                     help="int4 rounding: rtn round-to-nearest; clip + per-group clipping search (no data); awq + "
                          "activation-aware scales calibrated on a prompt text; gptq rounding with error feedback on "
                          "the calibration Hessian; awq-gptq awq's scales, then gptq."),
        click.option("--quantize-activations", type=click.Choice(list(ACTIVATIONS)), default="none",
                     show_default=True,
                     help="fp8: static adds FP8 E4M3 activations with per-tensor scales calibrated on a prompt "
                          "text (W8A8); static-no-down the same but down_proj inputs stay float. int4 on ort: "
                          "dynamic computes with int8 activations quantized per row and group at run time "
                          "(MatMulNBits accuracy_level 4; faster on the CPU, not exact)."),
        click.option("--quantize-calibration", type=click.Path(dir_okay=False), default=None,
                     help="Prompt text (UTF-8) for awq / gptq / static activations (default: the one moec ships)."),
    ]):
        fn = option(fn)
    return fn


def quantize_fields(quantize: str | None, quantize_group: int | None, quantize_scope: str,
                    quantize_asymmetric: bool, quantize_method: str = "rtn", quantize_activations: str = "none",
                    quantize_calibration: str | None = None) -> dict:
    return dict(quantize=quantize, quantize_group=quantize_group, quantize_scope=quantize_scope,
                quantize_symmetric=not quantize_asymmetric, quantize_method=quantize_method,
                quantize_activations=quantize_activations, quantize_calibration=quantize_calibration)
