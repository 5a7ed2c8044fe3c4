"""The quantization options ``moec optimize`` and ``moec compile`` share (one definition, so the
two commands cannot drift). They fill the stage dataclasses' ``quantize*`` fields."""

from __future__ import annotations

import click

from moec.common.contract import INT4_GROUPS as GROUPS
from moec.common.contract import QUANT_FORMATS as FORMATS
from moec.common.contract import QUANT_SCOPES as SCOPES


def quantize_options(fn):
    for option in reversed([
        click.option("--quantize", type=click.Choice(list(FORMATS)), default=None,
                     help="Quantize weights: int4 (blockwise, weight-only), int8 (per output channel), fp8 "
                          "(E4M3, per output channel). Routing stays full precision."),
        click.option("--quantize-group", type=click.Choice([str(g) for g in GROUPS]), default=None,
                     callback=lambda ctx, param, v: None if v is None else int(v),
                     help="int4 group size along K (default 128)."),
        click.option("--quantize-scope", type=click.Choice(list(SCOPES)), default="experts", show_default=True,
                     help="experts: routed experts; mlp: + shared expert and dense MLPs; all: + attention."),
        click.option("--quantize-asymmetric", "quantize_asymmetric", is_flag=True,
                     help="int4 with a zero point per group (default symmetric)."),
    ]):
        fn = option(fn)
    return fn


def quantize_fields(quantize: str | None, quantize_group: int | None, quantize_scope: str,
                    quantize_asymmetric: bool) -> dict:
    return dict(quantize=quantize, quantize_group=quantize_group, quantize_scope=quantize_scope,
                quantize_symmetric=not quantize_asymmetric)
