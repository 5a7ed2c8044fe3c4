"""Per-rank TensorRT-RTX engines (sm89, on the CPU) for tp 2 and ep 2 partitions of the demo."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from moec_cli import run_cli  # noqa: E402

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler.build.parallel import load_rank_engines
from moec.compiler.partition import ParallelConfig, optimize_partitioned
from moec.compiler.pipeline import OptimizeConfig

pytest.importorskip("tensorrt_rtx")
pytestmark = pytest.mark.trt


@pytest.fixture(scope="module")
def built(demo_onnx, tmp_path_factory, request):
    out = {}
    root = tmp_path_factory.mktemp("par_build")
    for name, (tp, ep) in {"tp2": (2, 1), "ep2": (1, 2)}.items():
        part = root / f"{name}_part"
        optimize_partitioned(demo_onnx, part, OptimizeConfig(target="trt-rtx:sm89"), ParallelConfig(tp, ep))
        out[name] = (part, root / f"{name}_eng")
    return out


@pytest.mark.parametrize("name,layers", [("tp2", 8), ("ep2", 2)])
def test_moec_build_one_engine_per_rank(built, name, layers, capsys):
    part, eng = built[name]
    code, out, err = run_cli(["build", part, "-o", eng, "--arch", "sm89", "--builder", "trt-rtx", "--no-progress"], capsys)
    assert code in (0, None), err
    manifest = json.loads((eng / contract.PARALLEL_MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["archs"] == ["sm89"]
    for r in manifest["ranks"]:
        assert r["dist_collective_layers"] == layers
        rank_manifest = json.loads((eng / r["dir"] / contract.ENGINE_MANIFEST).read_text())
        assert rank_manifest["parallel"]["rank"] == r["rank"] and rank_manifest["parallel"]["world_size"] == 2
        assert rank_manifest["parallel"]["partition_id"] == manifest["partition_id"]
        assert rank_manifest["engines"][0]["sha256"] == r["engines"][0]["sha256"]
    engines = load_rank_engines(eng, world_size=2)
    assert sorted(engines) == [0, 1] and all(p.is_file() for p in engines.values())


def test_loading_refuses_incomplete_or_mixed_sets(built, tmp_path):
    tp_eng, ep_eng = built["tp2"][1], built["ep2"][1]
    if not (tp_eng / contract.PARALLEL_MANIFEST).is_file() or not (ep_eng / contract.PARALLEL_MANIFEST).is_file():
        pytest.skip("needs the builds above")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tp_eng, incomplete)
    shutil.rmtree(incomplete / "rank1")
    with pytest.raises(MoecError, match="rank set is incomplete"):
        load_rank_engines(incomplete)
    mixed = tmp_path / "mixed"
    shutil.copytree(tp_eng, mixed)
    shutil.rmtree(mixed / "rank1")
    shutil.copytree(ep_eng / "rank1", mixed / "rank1")
    with pytest.raises(MoecError, match="mixed rank set"):
        load_rank_engines(mixed)
    with pytest.raises(MoecError, match="for 2 ranks but 4 were launched"):
        load_rank_engines(tp_eng, world_size=4)
    from moec.runtime.parallel.rankset import check_rank_set

    with pytest.raises(MoecError, match="holds per-rank TensorRT engines"):  # moec run ENG_DIR
        check_rank_set(tp_eng)


def test_build_refuses_a_bad_partition_folder_before_any_work(built, tmp_path, capsys):
    part = tmp_path / "part"
    shutil.copytree(built["tp2"][0], part)
    (part / "rank1.onnx").unlink()
    code, out, err = run_cli(["build", part, "-o", tmp_path / "eng", "--arch", "sm89", "--no-progress"], capsys)
    assert code == 2 and "missing rank file rank1.onnx" in err
    assert not (tmp_path / "eng").exists()


def test_quantized_rank_graphs_are_checked_before_any_work(demo_onnx, tmp_path, capsys):
    """--tp/--ep with --quantize: the format against the target and a calibrated method are named
    before any rank is written; nvfp4 rank graphs record their quantization, so `moec build` refuses
    an arch without FP4 tensor cores by name too (the engines themselves: test_quantized_engines.py)."""
    out = tmp_path / "part"
    for config, message in [(OptimizeConfig(target="trt-rtx:sm89", quantize="nvfp4"), "NVFP4 needs FP4 tensor cores"),
                            (OptimizeConfig(target="trt-rtx:sm89", quantize="int4", quantize_group=32,
                                            quantize_method="gptq"), "--tp/--ep rank graphs hold slices")]:
        with pytest.raises(MoecError, match=message):
            optimize_partitioned(demo_onnx, out, config, ParallelConfig(2, 1))
        assert not out.exists()
    optimize_partitioned(demo_onnx, out, OptimizeConfig(target="trt-rtx:sm120", quantize="nvfp4"), ParallelConfig(1, 2))
    for rank in range(2):
        side = json.loads((out / f"rank{rank}.moec.json").read_text())
        assert side["quantization"]["format"] == "nvfp4" and side["quantization"]["weights"] == 4
    code, _, err = run_cli(["build", out, "-o", tmp_path / "eng", "--arch", "sm89", "--builder", "trt-rtx"], capsys)
    assert code == 2 and "has NVFP4 weights" in err and "sm89 has no FP4 tensor cores" in err
    assert "Traceback" not in err and not (tmp_path / "eng").exists()
