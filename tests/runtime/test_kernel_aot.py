"""Ahead-of-time compilation of the MoE kernels for the target GPUs (runtime/kernels/aot.py).

This session runs the kernels under Triton's interpreter (tests/conftest.py), whose kernel objects
cannot be compiled, so every compile runs in a child process without TRITON_INTERPRET. Shapes are
Llama 4's experts (H=5120, I=8192): the tensors are meta tensors, so nothing is allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def run_child(code: str) -> object:
    """Run ``code`` (which prints one JSON value last) in a fresh interpreter without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The token counts on both expert counts, k=1 and 2: decode (FMA rows and tensor-core rows)
# and prefill with each row tile the defaults pick.
POINTS = [(16, 1, 1), (128, 16, 1), (16, 128, 2), (128, 1024, 1), (16, 4096, 1)]


@pytest.fixture(scope="module")
def default_survey():
    code = f"""
import json, torch
from moec.runtime.kernels import aot
rows = aot.survey(("sm80", "sm89", "sm90"), {POINTS!r}, (torch.bfloat16,))
rows += aot.survey(("sm89",), [(16, 1, 1), (16, 4096, 1)], (torch.float16,), score_on_input=False)
print(json.dumps(rows))
"""
    return run_child(code)


def test_default_configs_fit_a100_l4_h100(default_survey):
    """The untuned defaults are the 'safe default elsewhere': every kernel they launch compiles
    for sm80, sm89 and sm90 within shared memory and registers, with no spills."""
    rows = default_survey
    kernels = {(r["arch"], r["kernel"]) for r in rows}
    for arch in ("sm80", "sm89", "sm90"):
        for name in ("_decode_group_kernel", "_decode_gate_up_kernel", "_decode_down_kernel",
                     "_align_count_kernel", "_align_place_kernel", "_prefill_gate_up_kernel", "_prefill_down_kernel"):
            assert (arch, name) in kernels
    assert [r for r in rows if r["problems"]] == []
    for r in rows:
        assert 0 < r["registers"] <= 255
        assert r["local_bytes"] == 0


def test_tensor_core_kernels_are_pipelined(default_survey):
    """Every kernel with a tl.dot streams its K loop through asynchronous copies (cp.async or TMA)
    into a multi-stage shared buffer. Triton only does that when it can prove the inner strides
    are 1, which it learns from the call's argument values: a compile that missed that
    specialization would use a third of the shared memory and no async copies."""
    dot_rows = [r for r in default_survey if r["kernel"].startswith("_prefill") or r["constexprs"].get("USE_DOT")]
    assert dot_rows
    # Each kernel's inner (unit) strides, which the specialization must have made constants.
    unit_strides = {
        "_decode_gate_up_kernel": ("stride_xh", "stride_wn"), "_prefill_gate_up_kernel": ("stride_xh", "stride_wn"),
        "_decode_down_kernel": ("stride_wh",), "_prefill_down_kernel": ("stride_wh",),
    }
    for r in dot_rows:
        assert r["async_copies"] > 0, r
        for name in unit_strides[r["kernel"]]:
            assert r["constexprs"].get(name) == 1, (r["kernel"], name)
    prefill_90 = [r for r in dot_rows if r["arch"] == "sm90" and r["kernel"] == "_prefill_gate_up_kernel" and r["T"] == 4096]
    # 3 stages of the x, gate and up tiles (64x64 bf16 each = 8 KiB): at least 2 buffered.
    assert prefill_90 and prefill_90[0]["shared_bytes"] >= 2 * 3 * 64 * 64 * 2


def test_decode_up_to_the_grouping_cap_fits():
    """A tuned table may send up to DECODE_GROUP_MAX_PAIRS pairs down the decode path (the search
    starts decode at T <= 128): the one-program grouping, whose [P, P] masks grow with the cap,
    must not spill there either, for int32 and int64 ids."""
    code = """
import json, torch
from moec.runtime.kernels import aot, moe_triton as mt
cap = mt.DECODE_GROUP_MAX_PAIRS
rows = []
for E, T, k in [(128, cap, 1), (16, cap // 2, 2)]:
    rows += aot.survey(("sm80", "sm90"), [(E, T, k)], (torch.bfloat16,), config=mt.default_config("decode", E, T, k))
print(json.dumps([r for r in rows if r["kernel"] == "_decode_group_kernel"]))
"""
    rows = run_child(code)
    assert {r["ids_dtype"] for r in rows} == {"int32", "int64"} and {r["arch"] for r in rows} == {"sm80", "sm90"}
    assert [r["problems"] for r in rows if r["problems"]] == []


def test_oversized_config_is_reported_for_l4_not_h100():
    """The check can fail: 128x128 prefill tiles over K steps of 64 with 4 stages need about 192 KiB
    of shared memory, more than an L4 (sm89, 99 KiB per block) has, but they fit an H100 (227 KiB)."""
    code = """
import json, torch
from moec.runtime.kernels import aot
from moec.runtime.kernels.moe_triton import LaunchConfig
cfg = LaunchConfig(path="prefill", block_m=128, block_n_gate_up=128, block_n_down=128, block_k=64,
                   num_warps=8, num_stages=4)
rows = aot.survey(("sm89", "sm90"), [(16, 4096, 1)], (torch.bfloat16,), config=cfg)
print(json.dumps(rows))
"""
    rows = run_child(code)
    by_arch = {}
    for r in rows:
        by_arch.setdefault(r["arch"], []).append(r)
    l4_problems = [p for r in by_arch["sm89"] for p in r["problems"]]
    assert any("shared memory" in p and "sm89" in p for p in l4_problems), l4_problems
    assert all(r["shared_bytes"] > 99 * 1024 for r in by_arch["sm89"] if r["kernel"] == "_prefill_gate_up_kernel")
    assert [p for r in by_arch["sm90"] for p in r["problems"] if "shared memory" in p] == []


def test_ptx_targets_the_requested_arch():
    code = """
import json
from moec.runtime.kernels import aot
launch = aot.launches_for(16, 256, 128, 1)[1]
out = {}
for arch in (80, 89, 90):
    _, compiled = aot.compile_launch(launch, arch)
    out[arch] = [l.strip() for l in compiled.asm["ptx"].splitlines() if l.startswith(".target")]
print(json.dumps(out))
"""
    out = run_child(code)
    assert out["80"] == [".target sm_80"]
    assert out["89"] == [".target sm_89"]
    assert out["90"] == [".target sm_90a"]


def test_launches_match_the_path_the_config_picks():
    """The recorded launches come from the host code itself: decode is grouping + two GEMMs,
    prefill is two alignment launches and two GEMMs; grids follow the shapes."""
    from moec.runtime.kernels import aot

    names = lambda ls: [x.name for x in ls]  # noqa: E731
    decode = aot.launches_for(16, 5120, 8192, 1)
    assert names(decode) == ["_decode_group_kernel", "_decode_gate_up_kernel", "_decode_down_kernel"]
    assert decode[1].grid == (1, 8192 // 64, 2) and decode[2].grid == (1, 5120 // 64, 4)
    prefill = aot.launches_for(128, 5120, 8192, 4096)
    assert names(prefill) == ["_align_count_kernel", "_align_place_kernel", "_prefill_gate_up_kernel", "_prefill_down_kernel"]
    assert prefill[0].grid == prefill[1].grid == (4096 // 128,)  # 128-pair chunks
    # 32 rows per expert on average -> BLOCK_M 32; blocks = cdiv(4096, 32) + min(4096, 128).
    assert prefill[2].grid == (4096 // 32 + 128, 8192 // 64)


def test_unknown_arch_is_named():
    from moec.common.errors import MoecError
    from moec.runtime.kernels import aot

    with pytest.raises(MoecError, match="sm75.*checked for sm80"):
        aot.parse_arch("sm75")
    assert aot.parse_arch("sm89") == aot.parse_arch(89) == 89


def test_interpreted_kernels_are_refused_with_a_reason():
    """In this (interpreted) process the kernels cannot be compiled: a named error, not a Triton trace."""
    from moec.common.errors import MoecError
    from moec.runtime.kernels import aot, moe_triton

    if not moe_triton.INTERPRETED:
        pytest.skip("kernels are compiled kernels in this process")
    launch = aot.launches_for(16, 256, 128, 1)[0]
    with pytest.raises(MoecError, match="TRITON_INTERPRET=1"):
        aot.compile_launch(launch, 90)
