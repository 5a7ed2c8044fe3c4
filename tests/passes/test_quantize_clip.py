"""int4 per-block clipping search (passes/quantize/clip.py): never worse than round-to-nearest per
block (property), fires where a block has an outlier, must not fire where round-to-nearest is
exact; the method options are named errors where they do not apply."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moec.common.errors import MoecError
from moec.passes.quantize import make_spec
from moec.passes.quantize.clip import block_sq_error, quantize_int4_clip
from moec.passes.quantize.int4 import INT4

# No subnormals: a block of them has a range whose fifteenth underflows (rounding to nearest too).
finite = st.floats(-4.0, 4.0, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=60, deadline=None)
@given(w=arrays(np.float32, st.tuples(st.integers(1, 80), st.integers(1, 4)), elements=finite),
       block=st.sampled_from([8, 32, 64]), symmetric=st.booleans())
def test_clip_error_is_never_worse_than_round_to_nearest(w, block, symmetric):
    block = min(block, w.shape[0])
    rtn = INT4.quantize(w, 0, block, symmetric)
    clip = quantize_int4_clip(w, 0, block, symmetric)
    assert clip.q.min() >= (-7 if symmetric else 0) and clip.q.max() <= (7 if symmetric else 15)
    assert np.all(block_sq_error(w, clip) <= block_sq_error(w, rtn))
    # awq's form: the error weighted by each input channel's calibrated energy.
    h = np.random.default_rng(len(w)).exponential(1.0, (w.shape[0], 1)).astype(np.float32)
    weighted = quantize_int4_clip(w, 0, block, symmetric, importance=h)
    assert np.all(block_sq_error(w, weighted, h) <= block_sq_error(w, rtn, h))


def test_fires_on_gaussian_blocks():
    # A Gaussian block's extremes are rare: shrinking the range trades them for finer steps.
    w = np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32)
    rtn, clip = INT4.quantize(w, 0, 32, True), quantize_int4_clip(w, 0, 32, True)
    assert np.mean(clip.scale < rtn.scale) > 0.5
    assert block_sq_error(w, clip).sum() < 0.95 * block_sq_error(w, rtn).sum()


@pytest.mark.parametrize("symmetric", [True, False])
def test_must_not_fire_where_round_to_nearest_is_exact(symmetric):
    rng = np.random.default_rng(1)
    top = 7 if symmetric else 8  # asymmetric: 16 levels, -7 .. 8 steps (zero point 7)
    levels = rng.integers(-7, top + 1, (64, 8)).astype(np.float32)
    levels[[0, 32]], levels[[1, 33]] = top, -7  # each block spans the full grid: its values are exact levels
    w = levels * np.float32(0.03125)
    rtn, clip = INT4.quantize(w, 0, 32, symmetric), quantize_int4_clip(w, 0, 32, symmetric)
    assert np.array_equal(clip.q, rtn.q) and np.array_equal(clip.scale, rtn.scale)


def test_method_options_are_named_errors(tmp_path):
    with pytest.raises(MoecError, match="--quantize-method clip: applies to int4"):
        make_spec("int8", method="clip")
    with pytest.raises(MoecError, match="--quantize-activations static: FP8 activations go with --quantize fp8"):
        make_spec("int4", activations="static")
    with pytest.raises(MoecError, match="--quantize-calibration: nothing calibrates"):
        make_spec("int4", method="clip", calibration=str(tmp_path))
    with pytest.raises(MoecError, match="no such file"):
        make_spec("int4", method="awq", calibration=str(tmp_path / "missing.txt"))
    with pytest.raises(MoecError, match="need --quantize"):
        make_spec(None, method="awq")
    spec = make_spec("int4", 128, method="clip")
    assert spec.label() == "int4-g128-clip" and spec.record()["method"] == "clip"
    assert make_spec("fp8", activations="static").label() == "fp8-w8a8"
