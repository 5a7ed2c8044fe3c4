"""`moec compile --tp/--ep`: the main job for several ranks, verified rank set against torch,
per-rank engines, and the refusals that come before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moec_cli import run_cli
from moec.common.errors import MoecError
from moec.compiler.compile import CompileConfig, compile_checkpoint


def test_compile_ep2_for_ort_verifies_the_ranks_and_runs(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["compile", "-o", str(out), "--target", "ort", "--ep", "2", "--json"], capsys)
    assert code == 0, err
    stages = {s["stage"]: s for s in json.loads(stdout)["stages"]}
    assert [s["status"] for s in stages.values()] == ["ok", "ok", "ok", "ok", "skipped", "skipped"], stages
    assert "2 ranks (tp 1 x ep 2)" in stages["optimize"]["detail"]
    ranks = out / "onnx" / "ranks"
    manifest = json.loads((ranks / "parallel.json").read_text())
    assert manifest["world_size"] == 2 and manifest["ep"] == 2
    verify = json.loads((out / "verify_report.json").read_text())
    # Every step's logits of rank 0 compared with torch: the prefill and verify's decode steps.
    assert verify["passed"] and len(verify["rows"]) == 7 and all(verify["greedy_match"])
    assert verify["ort"]["world_size"] == "2" and verify["ort"]["process_group"] == "gloo"
    # The rank set the compile wrote is what `moec run` starts.
    code, stdout, err = run_cli(["run", str(ranks), "--prompt-ids", "1 2 3", "--max-new-tokens", "4",
                                 "--rank-timeout", "60", "--json"], capsys)
    assert code in (0, None), err
    assert len(json.loads(stdout)["ids"]) == 4


def test_compile_tp2_builds_one_engine_per_rank(tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "out"
    report = compile_checkpoint(None, out, CompileConfig(target="trt-rtx:sm89", tp=2, verify=False, progress=False))
    assert [s.status for s in report.stages] == ["ok", "ok", "ok", "skipped", "skipped", "ok"]
    engines = json.loads((out / "engine" / "parallel.json").read_text())
    assert engines["world_size"] == 2 and engines["archs"] == ["sm89"]
    for r in engines["ranks"]:
        # each rank's engine holds TensorRT's own collectives, and its manifest names the rank
        assert r["dist_collective_layers"] > 0
        m = json.loads((out / "engine" / r["dir"] / "manifest.json").read_text())
        assert m["parallel"]["rank"] == r["rank"] and m["parallel"]["world_size"] == 2
        assert (out / "engine" / r["dir"] / r["engines"][0]["file"]).stat().st_size > 0
    assert report.artifacts["engine"] == str(out / "engine")
    _inspect_checks(out / "engine", capsys)


def _inspect_checks(engine, capsys):
    import shutil

    code, stdout, err = run_cli(["inspect", str(engine), "--json"], capsys)
    assert code in (0, None), err
    rep = json.loads(stdout)
    assert rep["parallel"]["world_size"] == 2 and len(rep["ranks"]) == 2 and rep["problems"] == []
    assert all(r["manifest"]["parallel"]["rank"] == i for i, r in enumerate(rep["ranks"]))
    # TensorRT ranks run on CUDA GPUs with NCCL; a host without them is told so before any rank starts.
    import torch

    if not torch.cuda.is_available():
        code, _, err = run_cli(["run", str(engine), "--prompt-ids", "1 2 3"], capsys)
        assert code == 2 and "CUDA GPUs with NCCL" in err and err.count("\n") == 1
    shutil.rmtree(engine / "rank1")
    code, _, err = run_cli(["inspect", str(engine)], capsys)
    assert code == 2 and "rank 1" in err and "incomplete" in err


@pytest.mark.parametrize("flags,what", [(["--tp", "3"], "over tp 3"), (["--ep", "3"], "4 experts (num_local_experts) over ep 3")])
def test_sizes_the_split_does_not_divide_are_refused_before_any_work(tmp_path, capsys, flags, what):
    out = tmp_path / "out"
    code, _, err = run_cli(["compile", "-o", str(out), "--target", "ort", *flags], capsys)
    assert code == 2 and what in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_verify_fails_on_a_rank_that_computes_wrongly(demo_ckpt, demo_onnx, tmp_path):
    """A rank set whose rank 1 holds scaled expert weights must fail the comparison (the check can fail)."""
    import onnx
    from onnx import numpy_helper

    from moec.common.artifacts import sha256_file
    from moec.compiler.partition import ParallelConfig, optimize_partitioned
    from moec.compiler.pipeline import OptimizeConfig
    from moec.compiler.verify import VerifyConfig
    from moec.compiler.verify_parallel import verify_rank_set

    folder = tmp_path / "ranks"
    optimize_partitioned(demo_onnx, folder, OptimizeConfig(target="ort"), ParallelConfig(1, 2))
    good = verify_rank_set(folder, demo_ckpt, VerifyConfig(decode_steps=2))
    assert good.passed and good.max_abs() < 1e-4

    path = folder / "rank1.onnx"
    model = onnx.load(path)
    experts = [t for t in model.graph.initializer if "experts" in t.name and t.data_type == onnx.TensorProto.FLOAT]
    assert experts, [t.name for t in model.graph.initializer][:20]
    for t in experts:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    onnx.save(model, path)
    # keep the rank set self-consistent, so the comparison (not the set check) is what fails
    manifest = json.loads((folder / "parallel.json").read_text())
    for r in manifest["ranks"]:
        if r["file"] == "rank1.onnx":
            r["sha256"] = sha256_file(path)
            r["files"]["rank1.onnx"] = r["sha256"]
    (folder / "parallel.json").write_text(json.dumps(manifest))
    bad = verify_rank_set(folder, demo_ckpt, VerifyConfig(decode_steps=2))
    assert not bad.passed and bad.max_abs() > 1e-3
    assert np.isfinite(bad.max_abs())


def test_rank_timeout_reaches_the_launcher(monkeypatch, tmp_path, capsys):
    """--rank-timeout on run is the process group's timeout (checked where it is handed over)."""
    import moec.runtime.parallel.launch as launch

    seen = {}

    def fake_run_parallel(folder, ids, gen_config, cfg=launch.LaunchConfig(), job=None):
        seen["timeout"] = cfg.timeout_s
        raise MoecError("stopped here")

    monkeypatch.setattr(launch, "run_parallel", fake_run_parallel)
    folder = tmp_path / "ranks"
    folder.mkdir()
    (folder / "parallel.json").write_text("{}")
    code, _, err = run_cli(["run", str(folder), "--backend", "ort", "--prompt-ids", "1 2", "--rank-timeout", "7"], capsys)
    assert code == 2 and "stopped here" in err and seen["timeout"] == 7.0
    code, _, err = run_cli(["run", str(folder), "--prompt-ids", "1", "--rank-timeout", "0"], capsys)
    assert code == 2 and "--rank-timeout" in err
