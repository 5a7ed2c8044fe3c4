"""benchmarks/kernel_bench.py on the CPU: its floor arithmetic, its baselines' semantics, and its
refusal to run without a GPU. (The timings themselves need an H100.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moec.runtime.kernels.reference import grouped_experts_reference, random_inputs, relative_error

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kernel_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "E, T, distinct, facts_floor_ms",
    [(16, 1, 1, 0.083), (16, 16, 11, 0.917), (16, 4096, 16, 1.398), (128, 128, 83, 6.920), (128, 4096, 128, 10.673)],
)
def test_floor_reproduces_the_h100_table_in_facts(bench, E, T, distinct, facts_floor_ms):
    # shared/FACTS.md: 3.02 TB/s, 738 TFLOP/s, H=5120, I=8192, top-1. FACTS prints the two roofs
    # rounded to three digits and the floors to three decimals, hence 0.2% or 0.0005 ms.
    floor, _, _ = bench.floor_ms(distinct, T, 5120, 8192, 3.02e12, 738e12)
    assert floor == pytest.approx(facts_floor_ms, rel=2e-3, abs=5e-4)


def test_expected_distinct_experts(bench):
    assert bench.expected_distinct(1, 16) == pytest.approx(1.0)
    assert bench.expected_distinct(4096, 128) == pytest.approx(128.0)
    assert 10 < bench.expected_distinct(16, 16) < 11


@pytest.mark.parametrize("baseline", ["grouped_mm_moe", "dense_moe"])
def test_baselines_compute_the_same_op(bench, baseline):
    x, ids, scores, w1, w2 = random_inputs(40, 8, 1, 32, 16, torch.bfloat16)
    ref = grouped_experts_reference(x, ids, scores, w1, w2, True)
    out = getattr(bench, baseline)(x, ids, scores, w1, w2)
    assert out.shape == ref.shape
    assert relative_error(out, ref) < 1e-2


def test_markdown_renders_missing_baselines(bench):
    row = {"E": 128, "T": 4096, "distinct_experts": 128, "floor_ms": 10.7, "kernel_ms": 12.0,
           "kernel_frac_of_floor": 10.7 / 12.0, "grouped_mm_ms": None, "dense_ms": None,
           "kernel_path": "prefill", "max_rel_err": 3e-3}
    md = bench.markdown({"device": "X", "torch": "t", "triton": "r", "bandwidth_TBps": 3.0, "matmul_TFLOPs": 700.0,
                         "H": 5120, "I": 8192, "rows": [row]})
    assert "| 128 | 4096 | 128 | 10.700 | 12.000 (89%) | - | - | prefill | 3.0e-03 |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_script_refuses_to_run_without_a_gpu(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr
    assert not out.exists()
