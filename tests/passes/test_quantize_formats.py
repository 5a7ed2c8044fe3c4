"""The quantizer's own error per tensor is what each format allows: never above the bound, and
reaching it (a quantizer that rounds badly, or one that does not quantize at all, fails)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from moec.common.errors import MoecError
from moec.passes.quantize import FORMATS, dequantize, make_spec


def _weight(shape, seed=0):
    # Heavy-ish tails, like trained weights, plus exact zeros and a whole zero block.
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(5, shape) * 0.02).astype(np.float32)
    w.reshape(-1)[::97] = 0.0
    return w


CASES = [
    ("int4", 32, True), ("int4", 64, True), ("int4", 128, True),
    ("int4", 32, False), ("int4", 128, False), ("int8", None, True), ("fp8", None, True),
]


@pytest.mark.parametrize("fmt,group,symmetric", CASES)
@pytest.mark.parametrize("shape,axis", [((256, 48), 0), ((3, 256, 40), 1)])
def test_error_within_and_reaching_the_format_bound(fmt, group, symmetric, shape, axis):
    spec = make_spec(fmt, group, "experts", symmetric)
    w = _weight(shape)
    # One all-zero block: the first block of every column, or (one scale per channel) the first channel.
    zero = (slice(None),) * axis + (slice(0, spec.block_for(shape[axis])),)
    w[zero if spec.fmt.granularity == "block" else (Ellipsis, 0)] = 0
    qt = spec.fmt.quantize(w, axis, spec.block_for(shape[axis]), symmetric)
    err = np.abs(dequantize(qt) - w)
    bound = spec.fmt.error_bound(w, qt)
    # fp32 rounding of w / scale and of q * scale: a few ulps of the values involved.
    slack = 4 * np.finfo(np.float32).eps * (np.abs(w) + bound)
    assert np.all(err <= bound + slack), float((err - bound).max())
    # The bound is tight: some element uses most of its allowance (a random tensor hits it).
    assert float((err / np.maximum(bound, 1e-30)).max()) > 0.9
    # A zero block dequantizes to exact zeros; zeros anywhere stay zero for symmetric formats.
    assert np.all(dequantize(qt)[w == 0] == 0) or not symmetric


def test_storage_ranges():
    w = _weight((128, 16))
    q4 = FORMATS["int4"].quantize(w, 0, 32, True).q
    assert -7 <= q4.min() and q4.max() <= 7 and np.abs(q4).max() == 7
    q4a = FORMATS["int4"].quantize(w, 0, 32, False)
    assert q4a.q.min() >= 0 and q4a.q.max() <= 15 and q4a.zero_point.min() >= 0 and q4a.zero_point.max() <= 15
    q8 = FORMATS["int8"].quantize(w, 0, 128, True)
    assert q8.scale.shape == (1, 16) and np.abs(q8.q).max() == 127
    f8 = FORMATS["fp8"].quantize(w, 0, 128, True)
    assert f8.q.dtype == ml_dtypes.float8_e4m3fn and float(np.abs(f8.q.astype(np.float32)).max()) == 448.0


def test_the_format_rounds_to_nearest():
    # Values exactly representable after scaling come back exactly.
    w = np.array([[7.0], [-3.0], [1.0], [0.0]] * 8, np.float32)  # K = 32, one column, max |w| = 7
    qt = FORMATS["int4"].quantize(w, 0, 32, True)
    assert np.array_equal(dequantize(qt), w)


@pytest.mark.parametrize("args,message", [
    (("int3",), "--quantize 'int3': choose one of int4, int8, fp8"),
    (("int4", 48), "--quantize-group 48: choose one of 32, 64, 128"),
    (("int8", 64), "--quantize-group applies to int4"),
    (("int4", None, "router"), "--quantize-scope 'router': choose one of experts, mlp, all"),
    (("fp8", None, None, False), "fp8 is symmetric only"),
    ((None, 64), "need --quantize"),
])
def test_bad_requests_are_named(args, message):
    with pytest.raises(MoecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_spec(*args)


def test_labels():
    assert make_spec("int4").label() == "int4-g128"
    assert make_spec("int4", 32, symmetric=False).label() == "int4-g32-asym"
    assert make_spec("fp8").label() == "fp8" and make_spec("int8").record()["granularity"] == "per_output_channel"


def test_the_cli_offers_exactly_the_formats_scopes_and_groups_the_passes_define():
    """The CLI takes its choices from common/contract.py (so `moec` starts without onnx-ir); they
    must be the passes' own."""
    from moec.common import contract
    from moec.passes.quantize import FORMATS, SCOPES
    from moec.passes.quantize.int4 import GROUPS

    assert tuple(FORMATS) == contract.QUANT_FORMATS
    assert tuple(SCOPES) == contract.QUANT_SCOPES
    assert tuple(GROUPS) == contract.INT4_GROUPS
