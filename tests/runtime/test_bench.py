"""``moec bench`` on the ONNX Runtime backend with the demo model's export (tiny settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moec.common.errors import MoecError
from moec.runtime.bench import BENCH_FORMAT, BenchConfig, bench_artifact, source_hashes

TINY = BenchConfig(prompt_len=4, gen_len=3, batch=2, repeats=2, warmup=1)


def test_bench_ort_result(demo_onnx):
    res = bench_artifact(demo_onnx, TINY)
    assert res["format"] == BENCH_FORMAT
    identity = res["artifact"].pop("identity")
    assert res["artifact"] == {"path": str(demo_onnx), "kind": "ort", "sha256": source_hashes(demo_onnx)["sha256"]}
    assert identity["dtype"] == "fp32" and identity["lowering"] == "none" and len(identity["model_config_sha256"]) == 64
    assert res["backend"]["backend"] == "ort" and "onnxruntime" in res["backend"]
    # conftest sets OMP_NUM_THREADS=1, which ONNX Runtime follows when --threads is not given.
    assert res["config"] == {"prompt_len": 4, "gen_len": 3, "batch": 2, "repeats": 2, "warmup": 1, "seed": 0, "threads": 1}
    assert set(res["host"]) == {"name", "machine", "cpu", "cores"}
    assert set(res["metrics"]) == {"prefill_ms", "decode_ms_per_step", "decode_tokens_per_s", "prefill_tokens_per_s"}
    for name, m in res["metrics"].items():
        assert len(m["repeats"]) == 2 and m["population"], name
        assert m["better"] == ("higher" if name.endswith("per_s") else "lower")
        if m["better"] == "lower":
            assert 0 < m["p50"] <= m["p90"] <= m["p99"], name
        else:  # the slow tail of a throughput is below its median
            assert m["p50"] >= m["p10"] >= m["p1"] > 0, name
    d = res["metrics"]
    # 2 prompts x 3 new tokens: the first from prefill, 2 decode steps per repeat, all steps pooled.
    assert "4 steps" in d["decode_ms_per_step"]["population"]


def test_throughput_and_latency_agree_at_every_percentile(monkeypatch):
    import types

    from moec.runtime import generate as generate_mod
    from moec.runtime.bench import run_bench

    # A virtual clock that only the backend's steps advance: the figures below are exact on any
    # machine, however loaded (real sleeps of 2 ms can take 10 ms on a busy shared runner).
    clock = [0.0]
    monkeypatch.setattr(generate_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Timed:
        """A backend whose steps take known times: one slow step per repeat (a GC pause)."""
        name, max_positions, eos_token_ids = "fake", 64, ()

        def __init__(self):
            self.calls = 0

        def init_cache(self, batch):
            return 0

        def forward(self, ids, pos, cache):
            self.calls += 1
            clock[0] += 0.02 if self.calls % 5 == 0 else 0.002
            return np.zeros((ids.shape[0], ids.shape[1], 8), np.float32), cache + ids.shape[1]

    m = run_bench(Timed(), BenchConfig(prompt_len=2, gen_len=5, batch=3, repeats=3, warmup=0))
    ms, tok = m["decode_ms_per_step"], m["decode_tokens_per_s"]
    for lat, thr in (("median", "median"), ("p50", "p50"), ("p90", "p10"), ("p99", "p1")):
        assert tok[thr] == pytest.approx(3 * 1e3 / ms[lat], rel=1e-12), (lat, thr)
    assert tok["repeats"] == pytest.approx([3e3 / v for v in ms["repeats"]])
    # One slow step in four does not drag the typical throughput down (a mean of the times would).
    assert ms["p50"] < 10 and tok["p50"] > 3e3 / 10
    assert ms["p99"] > 10 and tok["p1"] < 3e3 / 10
    pre, pre_tok = m["prefill_ms"], m["prefill_tokens_per_s"]
    assert pre_tok["p50"] == pytest.approx(3 * 2 * 1e3 / pre["p50"])


def test_bench_bad_inputs(demo_onnx, tmp_path):
    with pytest.raises(MoecError, match="exceed the artifact's 512 positions"):
        bench_artifact(demo_onnx, BenchConfig(prompt_len=500, gen_len=20, repeats=1))
    with pytest.raises(MoecError, match="--backend trt needs an engine directory"):
        bench_artifact(demo_onnx, TINY, backend="trt")
    with pytest.raises(MoecError, match="does not exist"):
        bench_artifact(tmp_path / "nope.onnx", TINY)
    with pytest.raises(MoecError, match="neither an .onnx file nor an engine directory"):
        bench_artifact(tmp_path, TINY)
    with pytest.raises(MoecError, match="repeats must be >= 1"):
        BenchConfig(repeats=0)
    with pytest.raises(MoecError, match="gen-len must be >= 2"):
        BenchConfig(gen_len=1)


def test_cli_bench_then_gate(demo_onnx, tmp_path, capsys):
    from moec.compiler.cli import main

    out = tmp_path / "r.json"
    main(["bench", str(demo_onnx), "--json-out", str(out), "--prompt-len", "4", "--gen-len", "2", "--repeats", "2"])
    res = json.loads(out.read_text())
    assert res["metrics"]["decode_ms_per_step"]["repeats"] and "wrote" in capsys.readouterr().out
    # A result gated against itself passes (two repeats on a shared CPU are noisy: widen the cap).
    main(["gate", str(out), "--baseline", str(out), "--max-noise", "900%"])


def test_cli_bench_refuses_to_write_over_the_artifact(demo_onnx, tmp_path, capsys):
    import shutil

    from moec.common import contract
    from moec.compiler.cli import main

    work = tmp_path / "w"
    work.mkdir()
    for f in demo_onnx.parent.iterdir():
        if f.is_file():
            shutil.copy2(f, work / f.name)
    model = work / demo_onnx.name
    before = {f.name: f.read_bytes() for f in work.iterdir()}
    for target in (model, contract.sidecar_path(model), work / contract.TOKENIZER_FILE, work / "." / model.name):
        with pytest.raises(SystemExit) as e:
            main(["bench", str(model), "--json-out", str(target), "--prompt-len", "2", "--gen-len", "1", "--repeats", "1"])
        assert e.value.code == 2 and "benched artifact" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in work.iterdir()} == before
