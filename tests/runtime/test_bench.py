"""``moec bench`` on the ONNX Runtime backend with the demo model's export (tiny settings)."""

from __future__ import annotations

import json

import pytest

from moec.common.errors import MoecError
from moec.runtime.bench import BENCH_FORMAT, BenchConfig, bench_artifact, source_hashes

TINY = BenchConfig(prompt_len=4, gen_len=3, batch=2, repeats=2, warmup=1)


def test_bench_ort_result(demo_onnx):
    res = bench_artifact(demo_onnx, TINY)
    assert res["format"] == BENCH_FORMAT
    assert res["artifact"] == {"path": str(demo_onnx), "kind": "ort", "sha256": source_hashes(demo_onnx)["sha256"]}
    assert res["backend"]["backend"] == "ort" and "onnxruntime" in res["backend"]
    assert res["config"] == {"prompt_len": 4, "gen_len": 3, "batch": 2, "repeats": 2, "warmup": 1, "seed": 0}
    assert set(res["metrics"]) == {"prefill_ms", "decode_ms_per_step", "decode_tokens_per_s", "prefill_tokens_per_s"}
    for name, m in res["metrics"].items():
        assert len(m["repeats"]) == 2, name
        assert 0 < m["p50"] <= m["p90"] <= m["p99"], name
        assert m["better"] == ("higher" if name.endswith("per_s") else "lower")
    # Throughput is consistent with latency: batch 2 tokens per decode step.
    d = res["metrics"]
    assert d["decode_tokens_per_s"]["median"] == pytest.approx(2e3 / d["decode_ms_per_step"]["median"], rel=0.5)


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


def test_cli_bench_then_gate(demo_onnx, tmp_path, capsys):
    from moec.compiler.cli import main

    out = tmp_path / "r.json"
    main(["bench", str(demo_onnx), "--json", str(out), "--prompt-len", "4", "--gen-len", "2", "--repeats", "2"])
    res = json.loads(out.read_text())
    assert res["metrics"]["decode_ms_per_step"]["repeats"] and "wrote" in capsys.readouterr().out
    # A result gated against itself passes.
    main(["gate", str(out), "--baseline", str(out)])


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
            main(["bench", str(model), "--json", str(target), "--prompt-len", "2", "--gen-len", "1", "--repeats", "1"])
        assert e.value.code == 2 and "benched artifact" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in work.iterdir()} == before
