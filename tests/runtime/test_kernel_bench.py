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
    assert "| 128 | 4096 | 128 | 10.700 | 12.000 (89%) | - | - | - | prefill | 3.0e-03 |" in md  # no tuning, no baselines
    row.update(tuned_ms=11.0, tuned_frac_of_floor=10.7 / 11.0, tuned_config={"path": "prefill"})
    md = bench.markdown({"device": "X", "torch": "t", "triton": "r", "bandwidth_TBps": 3.0, "matmul_TFLOPs": 700.0,
                         "H": 5120, "I": 8192, "rows": [row]})
    assert "| 12.000 (89%) | 11.000 (97%) prefill | - |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_script_refuses_to_run_without_a_gpu(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr
    assert not out.exists()


# --- --tune: the search and the table it writes --------------------------------------------------


def _separable_cost(best: dict):
    """ms = 1 + the number of fields off their best value; None (a failed candidate) for block_k 256."""

    def cost(cfg):
        if cfg.block_k == 256:
            return None
        return 1.0 + sum(getattr(cfg, name) != value for name, value in best.items())

    return cost


def test_coordinate_descent_finds_a_separable_optimum_and_skips_failures(bench):
    import time

    from moec.runtime.kernels.moe_triton import default_config

    target = {"split_k_gate_up": 4, "split_k_down": 8, "block_n_down": 128, "num_stages": 4}
    start = default_config("decode", 16, 1, 1)
    best, ms, trials = bench.coordinate_descent([start], _separable_cost(target), time.perf_counter() + 60)
    assert ms == 1.0 and all(getattr(best, k) == v for k, v in target.items())
    assert best.block_m == start.block_m  # decode's row tile follows T and is not searched
    assert any(c is None for _, c in trials) and best.block_k != 256
    assert trials[0] == (start, 5.0)


def test_coordinate_descent_keeps_the_defaults_within_noise_and_stops_at_the_deadline(bench):
    from moec.runtime.kernels.moe_triton import default_config

    start = default_config("prefill", 16, 4096, 1)
    flat = lambda cfg: 1.0 if cfg == start else 0.99  # noqa: E731 - a 1% gain is noise (MIN_GAIN 2%)
    best, ms, trials = bench.coordinate_descent([start], flat, deadline=float("inf"))
    assert best == start and ms == 1.0 and len(trials) > 1
    best, ms, trials = bench.coordinate_descent([start], flat, deadline=0.0)  # already past
    assert best == start and len(trials) == 1


def test_coordinate_descent_starts_from_the_better_path(bench):
    from moec.runtime.kernels.moe_triton import default_config

    decode, prefill = default_config("decode", 16, 16, 1), default_config("prefill", 16, 16, 1)
    cost = lambda cfg: 1.0 if cfg.path == "prefill" else 2.0  # noqa: E731
    best, _, _ = bench.coordinate_descent([decode, prefill], cost, deadline=float("inf"))
    assert best.path == "prefill"
    assert bench.coordinate_descent([decode], lambda cfg: None, float("inf"))[0] is None


def test_tuned_configs_file_is_read_back_through_the_environment(bench, tmp_path, monkeypatch):
    """The file --tune writes is a table moec uses as it is: MOEC_MOE_CONFIGS=<file> makes
    select_config return the tuned entries on that card, for every T of the bucket."""
    from dataclasses import replace

    from moec.common.artifacts import write_json_atomic
    from moec.runtime.kernels import moe_triton as mt

    tuned = replace(mt.default_config("decode", 16, 16, 1), split_k_down=8, block_n_down=32)
    rows = [{"E": 16, "T": 16, "tuned_config": bench.config_entry(tuned)}, {"E": 16, "T": 1}]  # T=1: search failed
    path = tmp_path / "h100_tuned_configs.json"
    write_json_atomic(path, bench.tuned_configs("NVIDIA H100 80GB HBM3", rows, 5120, 8192))
    monkeypatch.setenv(mt.CONFIG_ENV, str(path))
    mt.load_config_table.cache_clear()
    try:
        for T in (9, 16):
            cfg = mt.select_config(16, 5120, 8192, T, 1, "NVIDIA H100 80GB HBM3")
            assert cfg.tuned and cfg.split_k_down == 8 and cfg.block_n_down == 32 and cfg.path == "decode"
        assert not mt.select_config(16, 5120, 8192, 1, 1, "NVIDIA H100 80GB HBM3").tuned
        assert not mt.select_config(16, 5120, 8192, 16, 1, "NVIDIA L4").tuned
    finally:
        monkeypatch.delenv(mt.CONFIG_ENV)
        mt.load_config_table.cache_clear()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read it"),
        ('{"tuned": {"H100": {"E=16,H=5120,I=8192,T=16": {"block_k": 6', "not valid JSON.*truncated"),
        ('{"tuned": {"H100": {"E=16,T=16": {}}}}', r"tuned.H100\[E=16,T=16\]: keys are"),
        ('{"tuned": {"H100": {"E=16,H=5120,I=8192,T=16": {"blok_k": 64}}}}', r"unknown field\(s\) \['blok_k'\]"),
        ('{"tuned": {"H100": {"E=16,H=5120,I=8192,T=16": {"path": "fast"}}}}', "path must be 'decode' or 'prefill'"),
        ('{"tuned": {"H100": {"E=16,H=5120,I=8192,T=16": {"block_k": 48}}}}', "block_k must be a power of two"),
        ('{"tuned": {"H100": {"E=16,H=5120,I=8192,T=16": {"num_warps": 0}}}}', "num_warps must be a positive integer"),
        ('{"tuned": {"H100": {"E=16,H=5120,I=8192,T=16": {"num_warps": 3}}}}', "num_warps must be a power of two"),
        ('{"tuned": {"H100": {"E=16,H=5120,I=8192,T=16": {"block_k": 8}}}}', "block_k must be at least 16"),
        ('{"tuned": {"H100": {"E=16,H=5120,I=8192,T=24": {}}}}', "T a power of two"),
    ],
)
def test_a_bad_tuned_configs_file_is_named(tmp_path, monkeypatch, content, message):
    from moec.common.errors import MoecError
    from moec.runtime.kernels import moe_triton as mt

    path = tmp_path / "configs.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(mt.CONFIG_ENV, str(path))
    mt.load_config_table.cache_clear()
    try:
        with pytest.raises(MoecError, match=message) as info:
            mt.select_config(16, 5120, 8192, 16, 1, "NVIDIA H100 80GB HBM3")
        assert "MOEC_MOE_CONFIGS" in str(info.value) and str(path) in str(info.value)
    finally:
        monkeypatch.delenv(mt.CONFIG_ENV)
        mt.load_config_table.cache_clear()


def test_shipped_table_is_valid():
    import json
    from importlib import resources

    from moec.runtime.kernels import moe_triton as mt

    shipped = json.loads(resources.files("moec.runtime.kernels").joinpath(mt.CONFIG_FILE).read_text())
    assert mt.validate_config_table(shipped, "shipped") is shipped


# Decode with FMA rows (T=3) and tensor-core rows (T=16), prefill (T=40): with a constant timer
# the first start wins, so each T exercises one path's whole space.
@pytest.mark.parametrize("T", [3, 16, 40])
def test_every_candidate_of_the_search_computes_the_right_numbers(bench, monkeypatch, T):
    """tune_point with the real kernels (Triton's interpreter on the CPU, tiny shapes) and only the
    GPU timer replaced: every value the search may pick for every parameter passes the same
    correctness check the GPU run applies, so a tuned table can only hold configs that compute
    the op. A constant timer keeps the search on the defaults, so each value is tried once."""
    import argparse

    from moec.runtime.kernels import moe_triton

    if not moe_triton.INTERPRETED:
        pytest.skip("needs Triton's interpreter (a machine without a GPU)")
    monkeypatch.setattr(bench, "time_ms", lambda fn, iters, graph: 1.0)
    # Seeded: the check is the benchmark's per-token relative error, and in fp16 a token whose
    # uniform score is near 0 has an output near fp16's subnormals, so its relative error reaches
    # 0.03-0.27 under every config and both paths alike (60 seeds: 8 such; whole-output error
    # stays 3e-4). The GPU run uses bf16 and sigmoid scores, which keep clear of this.
    x, ids, scores, w1, w2 = random_inputs(T, 8, 1, 64, 32, torch.float16, seed=T)
    ref = grouped_experts_reference(x, ids, scores, w1, w2, True)
    row = {"E": 8, "T": T, "floor_ms": 0.5, "grouped_mm_ms": 2.0}
    bench.tune_point(row, x, ids, scores, w1, w2, ref, argparse.Namespace(iters=10), deadline=float("inf"))
    failed = [t["config"] for t in row["tuning_trials"] if t["ms"] is None]
    assert failed == []
    tried = {(t["config"]["path"], name, t["config"][name]) for t in row["tuning_trials"] for name in t["config"] if name != "path"}
    path = row["tuned_config"]["path"]
    for name, values in bench.SPACES[path].items():
        assert {v for (p, n, v) in tried if p == path and n == name} == set(values), name
    assert row["tuned_ms"] == 1.0 and row["tuned_frac_of_floor"] == 0.5 and row["tuned_faster_than_grouped_mm"]


@pytest.mark.parametrize("T, E, expected", [(1, 16, ["decode"]), (16, 16, ["decode", "prefill"]),
                                            (1024, 128, ["prefill"]), (4096, 16, ["prefill"] * 3)])
def test_search_starts_follow_the_regime(bench, monkeypatch, T, E, expected):
    """Both paths where either may win; the 128-row, 8-warp tiles where the GEMMs are compute-bound."""
    import argparse

    seen = {}

    def fake_descent(starts, cost, deadline):
        seen["starts"] = starts
        return None, None, []

    monkeypatch.setattr(bench, "coordinate_descent", fake_descent)
    row = {"E": E, "T": T, "floor_ms": 1.0}
    bench.tune_point(row, None, None, None, None, None, None, argparse.Namespace(iters=10), float("inf"))
    assert [c.path for c in seen["starts"]] == expected
    if len(expected) == 3:
        assert {(c.block_m, c.num_warps) for c in seen["starts"][1:]} == {(128, 8)}
    assert "tuned_config" not in row and row["tuning_trials"] == []


def test_the_longest_matching_device_key_wins(monkeypatch):
    """An L40S must read the L40S entries, not an L4's, whatever the table's order."""
    from moec.runtime.kernels import moe_triton as mt

    key = "E=16,H=5120,I=8192,T=1"
    table = {
        "default": mt.load_config_table()["default"],
        "tuned": {"L4": {key: {"split_k_down": 2}}, "L40S": {key: {"split_k_down": 8}}},
    }
    from moec.runtime.kernels import moe_configs

    monkeypatch.setattr(moe_configs, "load_config_table", lambda: table)  # where select_config reads it
    assert mt.select_config(16, 5120, 8192, 1, 1, "NVIDIA L40S").split_k_down == 8
    assert mt.select_config(16, 5120, 8192, 1, 1, "NVIDIA L4").split_k_down == 2


def test_main_runs_end_to_end_with_tuning_on_the_cpu(bench, monkeypatch, tmp_path):
    """The whole device visit's code path, run before a device is lent: main() with --tune on tiny
    shapes, the kernels in Triton's interpreter, only the GPU roofs and timer replaced. It must
    write the results JSON, the table and a tuned-configs file that moec then uses on that card."""
    import json

    from moec.runtime.kernels import moe_triton as mt

    if not mt.INTERPRETED:
        pytest.skip("needs Triton's interpreter (a machine without a GPU)")
    calls = []

    def fake_time_ms(fn, iters, graph):
        calls.append(graph)
        return 1.0 + 0.01 * (len(calls) % 7)  # varies, so the search has something to keep

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "_require_gpu", lambda: None)
    monkeypatch.setattr(bench, "time_ms", fake_time_ms)
    monkeypatch.setattr(bench, "measure_bandwidth_Bps", lambda: 3.0e12)
    monkeypatch.setattr(bench, "measure_matmul_flops", lambda: 7.0e14)
    monkeypatch.setattr(bench, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    out = tmp_path / "r.json"
    argv = ["--out", str(out), "--E", "8", "--T", "1", "40", "--H", "64", "--I", "32", "--iters", "2",
            "--tune", "--tune-budget-s", "120"]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "NVIDIA H100 80GB HBM3" and [(r["E"], r["T"]) for r in result["rows"]] == [(8, 1), (8, 40)]
    for r in result["rows"]:
        assert r["max_rel_err"] <= bench.ERR_LIMIT and r["kernel_ms"] > 0 and r["tuned_config"]["path"] in ("decode", "prefill")
        assert r["tuning_trials"] and all(t["ms"] is not None for t in r["tuning_trials"])
    assert True in calls and False in calls  # T=1 timed as a CUDA graph, T=40 not
    assert "| tuned |" in out.with_suffix(".md").read_text()
    tuned = tmp_path / "r_tuned_configs.json"
    table = json.loads(tuned.read_text())
    assert set(table["tuned"]["H100"]) == {"E=8,H=64,I=32,T=1", "E=8,H=64,I=32,T=64"}
    monkeypatch.setenv(mt.CONFIG_ENV, str(tuned))
    mt.load_config_table.cache_clear()
    try:
        for r in result["rows"]:
            cfg = mt.select_config(8, 64, 32, r["T"], 1, "NVIDIA H100 80GB HBM3")
            assert cfg.tuned and bench.config_entry(cfg) == r["tuned_config"]
    finally:
        monkeypatch.delenv(mt.CONFIG_ENV)
        mt.load_config_table.cache_clear()
