"""Real TensorRT-RTX engines from the demo model: the plain export, and the optimized graph for
every MoE lowering. TensorRT-RTX builds on the CPU; shapes are kept tiny so each build takes
seconds.

What TensorRT-RTX 1.7 does with each lowering (checked here, and asserted below):
- dense (and hybrid, the default, below): standard ONNX ops; engines build for sm80, sm89 and sm120.
- gather: standard ONNX ops; builds here (batch 1 profiles) but fails in Myelin (ssa_validation)
  once a profile allows batch > 1, so `moec optimize` refuses it for trt-rtx targets; the graph is
  made for full TensorRT (trt:sm89) and handed to TensorRT-RTX at batch 1.
- trt-native (TRT_MoE -> IMoELayer): parses, then the build fails, "Cannot decompose operation
  ... moe_fc1" (IMoELayer exists only for SM100/SM103/SM110 in full TensorRT).
- ort (com.microsoft.MoE): the parser has no importer and no plugin of that name: "Plugin not found".
- trt-plugin (moec's MoecGroupedExperts): moec's Python plugin cannot be hosted by TensorRT-RTX
  (moec.runtime.trt_plugin refuses it: the RTX parser aborts the process on a Python IPluginV3).
"""

from __future__ import annotations

import pytest

from moec.common.errors import MoecError

pytest.importorskip("tensorrt_rtx")

from moec.compiler.build import BuildConfig, build_engine  # noqa: E402

ARCHS = ("sm80", "sm89", "sm120")
# Tiny profile: batch 1, up to 8 new tokens, 24 past.
TINY = dict(max_batch=1, max_new_tokens=8, max_past=24, progress=False)
# The target each lowering is produced for (the passes refuse to emit ort, trt-native, gather and
# trt-plugin for a TensorRT-RTX target, so those graphs are made for the target that takes them and handed to
# TensorRT-RTX to record its own answer).
LOWERING_TARGET = {"gather": "trt:sm89", "dense": "trt-rtx:sm89", "trt-plugin": "trt:sm89",
                   "trt-native": "trt:sm100", "ort": "ort"}
REFUSED = {
    "trt-native": "Cannot decompose operation",
    "ort": "Plugin not found",
    "trt-plugin": "MoecGroupedExperts",
}


def test_demo_export_builds_for_three_archs(demo_onnx, tmp_path):
    result = build_engine(demo_onnx, tmp_path / "e", BuildConfig(archs=ARCHS, **TINY))
    m = result.manifest
    assert m["archs"] == list(ARCHS) and len(m["engines"]) == 3
    assert m["precision"] == "fp32" and m["limits"]["max_positions"] == 512
    assert {t["name"] for t in m["io"]["inputs"]} >= {"input_ids", "position_ids", "past_key.3", "past_value.3"}


@pytest.fixture(scope="module")
def optimized(demo_onnx, tmp_path_factory):
    pipeline = pytest.importorskip("moec.compiler.pipeline")
    cache = {}

    def get(lowering):
        if lowering not in cache:
            out = tmp_path_factory.mktemp(f"opt_{lowering}") / "model.onnx"
            pipeline.optimize_onnx(demo_onnx, out, pipeline.OptimizeConfig(target=LOWERING_TARGET[lowering], moe_lowering=lowering))
            cache[lowering] = out
        return cache[lowering]

    return get


@pytest.mark.parametrize("lowering", ["gather", "dense", "trt-plugin", "trt-native", "ort"])
def test_demo_optimized_graph_per_lowering(optimized, tmp_path, lowering):
    graph = optimized(lowering)
    out = tmp_path / "e"
    if lowering in REFUSED:
        with pytest.raises(MoecError, match=REFUSED[lowering]):
            build_engine(graph, out, BuildConfig(archs=ARCHS, **TINY))
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        return
    m = build_engine(graph, out, BuildConfig(archs=ARCHS, **TINY)).manifest
    assert [e["archs"] for e in m["engines"]] == [[a] for a in ARCHS]
    assert m["plugins"] == [] and m["source_onnx"]["file"] == "model.onnx"


@pytest.fixture(scope="module")
def optimized_default(demo_onnx, tmp_path_factory):
    """The demo export optimized as `moec compile` does for TensorRT-RTX sm89 (default lowering)."""
    pipeline = pytest.importorskip("moec.compiler.pipeline")
    out = tmp_path_factory.mktemp("opt_default") / "model.onnx"
    pipeline.optimize_onnx(demo_onnx, out, pipeline.OptimizeConfig(target="trt-rtx:sm89"))
    return out


def test_demo_optimized_graph_builds_prefill_and_decode_profiles(optimized_default, tmp_path, capsys):
    """A real sm89 engine from the optimized demo graph with both default profiles, recorded in
    the manifest and shown by `moec inspect` (limits kept small so the build takes seconds)."""
    import json

    from moec.compiler.cli import main

    out = tmp_path / "e"
    m = build_engine(optimized_default, out, BuildConfig(archs=("sm89",), max_batch=4, max_new_tokens=16, max_past=48,
                                                         progress=False)).manifest
    prefill, decode = m["profiles"]
    assert [(p["name"], p["index"]) for p in m["profiles"]] == [("prefill", 0), ("decode", 1)]
    # Prefill: a whole prompt (opt capped at the 16-token window), no past; decode: one token,
    # past tuned at the middle of 1..48, batch at half of 4.
    assert prefill["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 16], "max": [4, 16]}
    assert [prefill["shapes"]["past_key.3"][k][2] for k in ("min", "opt", "max")] == [0, 0, 48]
    assert decode["shapes"]["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [4, 1]}
    assert [decode["shapes"]["past_value.3"][k][2] for k in ("min", "opt", "max")] == [1, 24, 48]
    # Layers 0-2 are chunked: a ring of one chunk (8 slots), the same size in both profiles.
    for p in (prefill, decode):
        assert [p["shapes"]["past_value.0"][k][2] for k in ("min", "opt", "max")] == [8, 8, 8]
    # KV bytes per sequence at the engine's context (48 past + 1): 3 rings of 8 slots, 1 full cache
    # of 49, each 2 (k, v) x 2 kv heads x 16 dims x 4 bytes a slot.
    assert m["kv_cache"] == {"context": 49, "bytes_per_sequence": {"chunked": 3 * 8 * 256, "full": 49 * 256}}
    assert set(prefill["shapes"]) == set(decode["shapes"]) == {t["name"] for t in m["io"]["inputs"]}
    assert m["limits"] == {"max_batch": 4, "max_new_tokens": 16, "max_past": 48, "max_positions": 512}
    assert json.loads((out / "manifest.json").read_text())["profiles"] == m["profiles"]
    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "prefill #0" in text and "decode #1" in text and "4x16" in text
    # The rings (6 inputs: one fixed range) and the NoPE layer's key and value (the past range).
    assert "past K/V (6)" in text and "past K/V (2)" in text
    assert "KV cache per sequence at 49 tokens: 0.02 MiB (chunked 0.01 MiB, full 0.01 MiB)" in text
