"""Engine build stage with TensorRT for RTX on the CPU: real engines, manifest, and every bad input.

The small graphs here use the real moec I/O names (common/contract.py) and dynamic dims, so the
profile logic meets what an export produces; the demo model's own graphs are built in
test_build_demo.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moec.common import contract
from moec.common.errors import MoecError

trt = pytest.importorskip("tensorrt_rtx")

from moec.compiler.build import (  # noqa: E402
    BuildConfig,
    ProgressDisplay,
    build_engine,
    inspect_engine_dir,
    parse_shapes,
    plugins_needed,
)
from moec.runtime.trt_backend import read_engine_header  # noqa: E402

KVH, D, V, H = 2, 4, 16, 8


def write_moec_graph(folder: Path, layers: int = 2, extra_node=None, max_positions: int = 64) -> Path:
    """A tiny graph with a moec export's I/O: logits from an embedding and a head; each layer's
    present = concat(past, new K/V from the embedding)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    inputs = [
        helper.make_tensor_value_info(contract.INPUT_IDS, TensorProto.INT64, [contract.DIM_BATCH, contract.DIM_NEW_TOKENS]),
        helper.make_tensor_value_info(contract.POSITION_IDS, TensorProto.INT64, [contract.DIM_BATCH, contract.DIM_NEW_TOKENS]),
    ]
    outputs = [helper.make_tensor_value_info(contract.LOGITS, TensorProto.FLOAT, [contract.DIM_BATCH, contract.DIM_NEW_TOKENS, V])]
    inits = [
        numpy_helper.from_array(rng.standard_normal((V, H)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.standard_normal((H, V)).astype(np.float32), "head"),
        numpy_helper.from_array(np.array([0, 0, KVH, D], dtype=np.int64), "kv_shape"),
    ]
    nodes = [helper.make_node("Gather", ["emb", contract.INPUT_IDS], ["x_BSH"]), helper.make_node("MatMul", ["x_BSH", "head"], ["h_BSV"])]
    last = "h_BSV"
    if extra_node is not None:
        nodes.append(extra_node(last, "h2_BSV"))
        last = "h2_BSV"
    nodes.append(helper.make_node("Identity", [last], [contract.LOGITS]))
    for layer in range(layers):
        for past, present in ((contract.past_key(layer), contract.present_key(layer)), (contract.past_value(layer), contract.present_value(layer))):
            dims = [contract.DIM_BATCH, KVH, contract.DIM_PAST, D]
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, dims))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, [contract.DIM_BATCH, KVH, "total", D]))
            nodes += [
                helper.make_node("Reshape", ["x_BSH", "kv_shape"], [f"{past}_BSKD"]),
                helper.make_node("Transpose", [f"{past}_BSKD"], [f"{past}_BKSD"], perm=[0, 2, 1, 3]),
                helper.make_node("Concat", [past, f"{past}_BKSD"], [present], axis=2),
            ]
    graph = helper.make_graph(nodes, "tiny_moec", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(contract.PLUGIN_NAMESPACE, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    path = folder / "model.onnx"
    onnx.save(model, path)
    sidecar = {"model_config": {"max_position_embeddings": max_positions}, "dtype": "fp32", "num_layers": layers,
               "vocab_size": V, "max_positions": max_positions, "max_batch": 2,
               "generation": {"eos_token_ids": [1], "max_positions": max_positions}}
    contract.sidecar_path(path).write_text(json.dumps(sidecar))
    (folder / contract.TOKENIZER_FILE).write_text("{}")
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_moec_graph(tmp_path / "src")


def quiet(**kw) -> BuildConfig:
    return BuildConfig(progress=False, **kw)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_builds_one_engine_per_arch_with_manifest(tiny, tmp_path):
    out = tmp_path / "engines"
    result = build_engine(tiny, out, quiet(archs=("sm80", "sm89", "sm120")))
    m = json.loads((out / contract.ENGINE_MANIFEST).read_text())
    assert m == result.manifest
    assert m["trt"] == {"flavour": "tensorrt-rtx", "module": "tensorrt_rtx", "version": trt.__version__}
    assert m["archs"] == ["sm80", "sm89", "sm120"]
    for entry in m["engines"]:
        blob = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
        header = read_engine_header(out / entry["file"])
        # The engine header says the same as the manifest: flavour, version, target arch.
        assert header["flavour"] == "tensorrt-rtx" and header["version"] == trt.__version__
        assert header["archs"] == entry["archs"]
    assert m["source_onnx"]["files"] == {"model.onnx": hashlib.sha256(tiny.read_bytes()).hexdigest()}
    assert m["precision"] == "fp32" and m["strongly_typed"] is True and m["plugins"] == []
    # Sidecar limits: batch 2, positions 64: a prompt of up to 32 tokens, decode up to past 63.
    assert m["limits"] == {"max_batch": 2, "max_new_tokens": 32, "max_past": 63, "max_positions": 64}
    prefill, decode = m["profiles"]
    assert (prefill["name"], prefill["index"], decode["name"], decode["index"]) == ("prefill", 0, "decode", 1)
    # Prefill: opt at a typical prompt (128, capped at 32 here), no past; the box's corner
    # (32 new + 32 past) fits the 64 positions.
    assert prefill["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 32], "max": [2, 32]}
    assert prefill["shapes"]["past_key.1"] == {"min": [1, KVH, 0, D], "opt": [1, KVH, 0, D], "max": [2, KVH, 32, D]}
    # Decode: exactly one new token, past 1..63 tuned at the middle, batch tuned at half the max.
    assert decode["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [2, 1]}
    assert decode["shapes"]["position_ids"] == decode["shapes"]["input_ids"]
    assert decode["shapes"]["past_value.0"] == {"min": [1, KVH, 1, D], "opt": [1, KVH, 31, D], "max": [2, KVH, 63, D]}
    assert (out / "model.moec.json").is_file() and (out / contract.TOKENIZER_FILE).is_file()
    assert [t["name"] for t in m["io"]["outputs"]][:2] == ["logits", "present_key.0"]
    assert leftovers(tmp_path) == []


def test_inspect_on_a_cpu_reports_header_and_manifest(tiny, tmp_path):
    out = tmp_path / "engines"
    build_engine(tiny, out, quiet(archs=("sm89",)))
    report = inspect_engine_dir(out)
    (engine,) = report["engines"]
    assert engine["sha256_ok"] and engine["header"]["archs"] == ["sm89"]
    # TensorRT-RTX cannot deserialize without a GPU (checked here: cudaError 35), so no inspector.
    assert engine["deserialized"] is False and "no CUDA GPU" in engine["reason"]


def test_builder_config_gets_both_profiles(tiny):
    """What TensorRT is handed: two optimization profiles with the manifest's ranges (an engine's
    own profiles cannot be read back without a GPU)."""
    from moec.compiler.build import Limits, build_profiles, builder_config, make_logger, network_from_onnx
    from moec.runtime.trt_backend import import_trt

    flavour = import_trt("tensorrt-rtx")
    logger = make_logger(trt)
    builder, network, _ = network_from_onnx(flavour, tiny, logger)
    profiles = build_profiles(network, Limits(2, 32, 63, 64), quiet())
    cfg = builder_config(flavour, builder, network, "sm89", profiles, quiet(), None, logger, [])
    assert cfg.num_optimization_profiles == 2
    assert [p.shapes["input_ids"] for p in profiles] == [((1, 1), (1, 32), (2, 32)), ((1, 1), (1, 1), (2, 1))]


def test_shapes_without_prefix_build_one_custom_profile(tiny, tmp_path):
    cfg = quiet(archs=("sm89",), shapes=("input_ids:1x1,1x8,1x16 position_ids:1x1,1x8,1x16",))
    m = build_engine(tiny, tmp_path / "e", cfg).manifest
    (custom,) = m["profiles"]
    assert custom["name"] == "custom" and custom["index"] == 0
    assert custom["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 8], "max": [1, 16]}
    # Tensors not named keep both phases' range (past from 0, tuned at decode's middle).
    assert custom["shapes"]["past_key.0"] == {"min": [1, KVH, 0, D], "opt": [1, KVH, 16, D], "max": [2, KVH, 32, D]}
    assert m["limits"]["max_batch"] == 1 and m["limits"]["max_new_tokens"] == 16 and m["limits"]["max_past"] == 32


def test_shapes_with_a_profile_prefix_adjust_that_profile_only(tiny, tmp_path):
    # A decode profile that also takes up to 4 tokens a step (a speculative draft, say); its
    # corner 4 + 60 fits the 64 positions.
    cfg = quiet(archs=("sm89",), max_past=60, shapes=("decode:input_ids:1x1,1x1,2x4 decode:position_ids:1x1,1x1,2x4",
                                         "prefill:input_ids:1x1,1x16,1x24 prefill:position_ids:1x1,1x16,1x24"))
    m = build_engine(tiny, tmp_path / "e", cfg).manifest
    prefill, decode = m["profiles"]
    assert decode["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [2, 4]}
    assert prefill["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 16], "max": [1, 24]}
    # Unnamed tensors keep their defaults in each profile.
    assert prefill["shapes"]["past_key.0"]["max"] == [2, KVH, 32, D] and decode["shapes"]["past_key.0"]["max"] == [2, KVH, 60, D]
    assert m["limits"] == {"max_batch": 2, "max_new_tokens": 24, "max_past": 60, "max_positions": 64}


def test_prefill_opt_and_decode_batch_opt_are_configurable(tiny, tmp_path):
    m = build_engine(tiny, tmp_path / "e", quiet(prefill_opt_tokens=8, decode_opt_batch=2)).manifest
    assert m["profiles"][0]["shapes"]["input_ids"]["opt"] == [1, 8]
    assert m["profiles"][1]["shapes"]["input_ids"]["opt"] == [2, 1]


@pytest.mark.parametrize(
    "shapes, message",
    [
        (("input_ids:1x1,1x8,1x4",), "min <= opt <= max"),
        (("input_ids:1x1,1x8",), "name:MIN,OPT,MAX"),
        (("input_ids:1,1,4",), "rank"),
        (("past_key.0:1x3x0x4,1x3x1x4,1x3x8x4",), "fixed at 2"),
        (("nope:1x1,1x1,1x1",), "not a network input"),
        (("input_ids:1x1,1x1,1x60 position_ids:1x1,1x1,1x60",), "profile custom: .* exceed the model's 64 positions"),
        (("prefill:input_ids:1x1,1x1,1x60 prefill:position_ids:1x1,1x1,1x60",), "profile prefill: max new_tokens 60 \\+ max past_len 32 exceed"),
        (("decode:input_ids:1x1,1x1,1x2 decode:position_ids:1x1,1x1,1x2",), "profile decode: max new_tokens 2 \\+ max past_len 63"),
        (("decode:past_key.0:1x3x1x4,1x3x1x4,1x3x8x4",), "--shapes decode:past_key.0: axis 1 is fixed at 2"),
        (("decode:input_ids:1x1,1x1,1x1", "input_ids:1x1,1x1,1x1"), "mixes specs with a profile prefix"),
        (("prefil:input_ids:1x1,1x1,1x1",), "not a network input.*prefixes are prefill: and decode:"),
        # TensorRT needs axes sharing a graph name ("new_tokens") to share a range.
        (("decode:input_ids:1x1,2x1,2x1 decode:position_ids:1x1,2x1,2x1",),
         r"profile decode: input_ids axis 0 and past_key.0 axis 0 are both 'batch' .* get opt 2 and 1"),
        (("prefill:input_ids:1x1,1x16,1x24",),
         r"profile prefill: input_ids axis 1 and position_ids axis 1 are both 'new_tokens' .*--shapes prefill:position_ids"),
        # A step has at least one sequence and one token; only the cache may be empty.
        (("input_ids:0x0,1x1,1x1",), r"--shapes input_ids: axis 0 \(batch\) has min 0; a step needs at least 1"),
        (("decode:input_ids:1x0,1x1,1x1",), r"--shapes decode:input_ids: axis 1 \(new tokens\) has min 0"),
    ],
)
def test_impossible_shape_ranges_are_refused(tiny, tmp_path, shapes, message):
    with pytest.raises(MoecError, match=message):
        build_engine(tiny, tmp_path / "e", quiet(archs=("sm89",), shapes=shapes))
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("limits, message", [(dict(max_new_tokens=65), "--max-new-tokens 65 is outside 1..64"),
                                             (dict(max_past=64), "--max-past 64 is outside 1..63"),
                                             (dict(max_past=0), "--max-past 0: give at least 1"),
                                             (dict(max_batch=0), "--max-batch 0: give at least 1"),
                                             (dict(max_new_tokens=0), "--max-new-tokens 0: give at least 1")])
def test_limits_beyond_positions_are_refused(tiny, tmp_path, limits, message):
    with pytest.raises(MoecError, match=message):
        build_engine(tiny, tmp_path / "e", quiet(**limits))
    assert not (tmp_path / "e").exists()


def test_long_prompt_window_leaves_prefill_less_past(tiny, tmp_path):
    """Profiles are boxes: prefill's past shrinks so new + past fit the positions; decode keeps
    the whole context."""
    m = build_engine(tiny, tmp_path / "e", quiet(max_new_tokens=40, max_past=40)).manifest
    prefill, decode = m["profiles"]
    assert prefill["shapes"]["past_key.0"]["max"][2] == 24 and decode["shapes"]["past_key.0"]["max"][2] == 40
    assert m["limits"] == {"max_batch": 2, "max_new_tokens": 40, "max_past": 40, "max_positions": 64}


@pytest.mark.parametrize("arch, message", [("sm90", "TensorRT-RTX cannot target sm90; it targets sm75, "),
                                           ("sm100", "--builder trt"), ("h100", "cannot target sm90"),
                                           ("gpu9", "unknown arch gpu9"), ("sm42", "unknown arch sm42")])
def test_unsupported_arch(tiny, tmp_path, arch, message):
    with pytest.raises(MoecError, match=message) as e:
        build_engine(tiny, tmp_path / "e", quiet(archs=(arch,)))
    assert arch in str(e.value) or arch == "h100"
    assert not (tmp_path / "e").exists()


def test_unparseable_op_names_node_and_op(tmp_path):
    def foo(x, y):
        return helper.make_node("FooBar", [x], [y], name="my_foo", domain="weird")

    path = write_moec_graph(tmp_path / "src", extra_node=foo)
    with pytest.raises(MoecError) as e:
        build_engine(path, tmp_path / "e", quiet())
    assert "my_foo" in str(e.value) and "FooBar" in str(e.value) and "Plugin not found" in str(e.value)
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == []


def test_plugin_node_is_recorded_and_refused_by_tensorrt_rtx(tmp_path):
    def plugin(x, y):
        return helper.make_node(contract.PLUGIN_NAME, [x], [y], name="moe_0", domain=contract.PLUGIN_NAMESPACE,
                                plugin_version=contract.PLUGIN_VERSION, plugin_namespace=contract.PLUGIN_NAMESPACE)

    path = write_moec_graph(tmp_path / "src", extra_node=plugin)
    model = onnx.load(path)
    assert plugins_needed(model) == [{"name": contract.PLUGIN_NAME, "version": contract.PLUGIN_VERSION,
                                      "namespace": contract.PLUGIN_NAMESPACE}]
    # TensorRT-RTX cannot host moec's Python plugin (moec.runtime.trt_plugin says why), and without
    # it the parser cannot resolve the node: either way a MoecError naming the plugin, no artifact.
    with pytest.raises(MoecError, match=contract.PLUGIN_NAME):
        build_engine(path, tmp_path / "e", quiet())
    assert not (tmp_path / "e").exists()


def test_timing_cache_missing_is_created_and_reused(tiny, tmp_path):
    cache = tmp_path / "cache" / "timing.cache"
    r1 = build_engine(tiny, tmp_path / "e1", quiet(timing_cache=cache))
    assert cache.is_file() and any("will be created" in w for w in r1.warnings)
    r2 = build_engine(tiny, tmp_path / "e2", quiet(timing_cache=cache))
    assert not any("corrupt" in w or "created" in w for w in r2.warnings)


def test_a_file_that_is_not_a_timing_cache_is_refused_not_replaced(tiny, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(MoecError, match="is not a TensorRT timing cache"):
        build_engine(tiny, tmp_path / "e", quiet(timing_cache=cache))
    assert cache.read_bytes() == b"\x00garbage" * 20 and not (tmp_path / "e").exists()
    # A file of the model is refused as a cache before TensorRT sees it.
    with pytest.raises(MoecError, match="an input of this command"):
        build_engine(tiny, tmp_path / "e", quiet(timing_cache=contract.sidecar_path(tiny)))


def test_flags_that_do_not_apply_to_rtx(tiny, tmp_path):
    with pytest.raises(MoecError, match="--version-compatible does not apply to TensorRT-RTX"):
        build_engine(tiny, tmp_path / "e", quiet(version_compatible=True))
    for level in ("ampere+", "same-cc"):
        with pytest.raises(MoecError, match=f"--hardware-compat {re.escape(level)} does not apply to TensorRT-RTX"):
            build_engine(tiny, tmp_path / "e", quiet(hardware_compat=level))
    assert not (tmp_path / "e").exists()
    r = build_engine(tiny, tmp_path / "e", quiet(opt_level=0, workspace_mib=64))
    assert r.manifest["build_options"] == {"opt_level": 0, "hardware_compat": "none", "version_compatible": False,
                                           "workspace_mib": 64}


class _InterruptingDisplay(ProgressDisplay):
    """Raises KeyboardInterrupt from inside TensorRT's progress callbacks, as Ctrl-C would."""

    def __init__(self, after_steps: int):
        super().__init__(enabled=False)
        self.steps = 0
        self.after = after_steps

    def step(self, name, step):
        self.steps += 1
        if self.steps >= self.after:
            raise KeyboardInterrupt


def test_ctrl_c_cancels_and_leaves_previous_artifact(tiny, tmp_path):
    out = tmp_path / "e"
    first = build_engine(tiny, out, quiet(archs=("sm89",)))
    display = _InterruptingDisplay(after_steps=3)
    with pytest.raises(KeyboardInterrupt):
        build_engine(tiny, out, quiet(archs=("sm80", "sm89")), display=display)
    assert display.steps == 3  # the build stopped at the first interrupted step
    assert json.loads((out / contract.ENGINE_MANIFEST).read_text()) == first.manifest
    assert sorted(p.name for p in out.iterdir()) == sorted([".moec-output.json", "engine.sm89.plan", "manifest.json", "model.moec.json", "tokenizer.json"])
    assert leftovers(tmp_path) == []


def test_ctrl_c_on_a_fresh_build_leaves_nothing(tiny, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build_engine(tiny, tmp_path / "e", quiet(), display=_InterruptingDisplay(after_steps=1))
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == []


def test_parse_shapes():
    assert parse_shapes(("a:1x1,2x3,4x5", "b.0:1,2,3")) == {None: {"a": ((1, 1), (2, 3), (4, 5)), "b.0": ((1,), (2,), (3,))}}
    assert parse_shapes(("decode:a:1x1,1x1,2x1 prefill:a:1x1,1x4,1x8",)) == {
        "decode": {"a": ((1, 1), (1, 1), (2, 1))}, "prefill": {"a": ((1, 1), (1, 4), (1, 8))}}
    with pytest.raises(MoecError, match="integers"):
        parse_shapes(("a:1xq,1x1,1x1",))


def test_cli_build_and_inspect(tiny, tmp_path, capsys):
    from moec.compiler.cli import main

    out = tmp_path / "e"
    with pytest.raises(SystemExit) as e:
        main(["build", str(tiny), "-o", str(out), "--arch", "sm90", "--no-progress"])
    assert e.value.code == 2 and "TensorRT-RTX cannot target sm90" in capsys.readouterr().err
    main(["build", str(tiny), "-o", str(out), "--arch", "sm89,sm120", "--no-progress", "--builder", "trt-rtx"])
    out_text = capsys.readouterr().out
    assert "built 2 engine(s) for sm89, sm120 with tensorrt-rtx" in out_text
    assert "profiles: prefill (#0) batch x new_tokens [1, 1]..[2, 32] opt [1, 32], past_len 0..32 opt 0; " \
           "decode (#1) batch x new_tokens [1, 1]..[2, 1] opt [1, 1], past_len 1..63 opt 31" in out_text
    assert "max prompt: 63 tokens (prefilled in chunks of up to 32)" in out_text
    main(["inspect", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [e["archs"] for e in report["engines"]] == [["sm89"], ["sm120"]]
    assert report["problems"] == [] and report["max_prompt_tokens"] == 63
    assert [p["name"] for p in report["manifest"]["profiles"]] == ["prefill", "decode"]
    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "tensorrt-rtx" in text and "not deserialized" in text and "present_value.1" in text
    # The profile table: prefill then decode, dims as --shapes writes them, past tensors grouped.
    assert "prefill #0" in text and "decode #1" in text and text.index("prefill #0") < text.index("decode #1")
    assert "past K/V (4)" in text and "2x2x63x4" in text
    # One network, one I/O table, however many archs.
    assert text.count("present_value.1") == 1 and "I/O tensors: as above" in text
    assert "max prompt: 63 tokens" in text


def test_source_hash_covers_external_data(tmp_path):
    src = write_moec_graph(tmp_path / "src")
    model = onnx.load(src)
    onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=0)
    data = src.with_name("model.onnx.data")
    m = build_engine(src, tmp_path / "e", quiet()).manifest
    assert m["source_onnx"]["files"] == {"model.onnx": hashlib.sha256(src.read_bytes()).hexdigest(),
                                         "model.onnx.data": hashlib.sha256(data.read_bytes()).hexdigest()}
    before = m["source_onnx"]["sha256"]
    blob = bytearray(data.read_bytes())
    blob[0] ^= 1
    data.write_bytes(bytes(blob))
    assert build_engine(src, tmp_path / "e", quiet()).manifest["source_onnx"]["sha256"] != before
    data.unlink()
    with pytest.raises(MoecError, match="external data that is not usable: .*model.onnx.data \\(missing\\)"):
        build_engine(src, tmp_path / "e2", quiet())


def test_truncated_external_data_is_named_before_parsing(tmp_path):
    src = write_moec_graph(tmp_path / "src")
    onnx.save_model(onnx.load(src), src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    data = src.with_name("model.onnx.data")
    data.write_bytes(data.read_bytes()[:-40])
    with pytest.raises(MoecError) as e:
        build_engine(src, tmp_path / "e", quiet())
    assert "model.onnx.data (has" in str(e.value) and "cannot parse" not in str(e.value)
    assert not (tmp_path / "e").exists()


def test_cli_refuses_zero_limits(tiny, tmp_path, capsys):
    from moec.compiler.cli import main

    for option in ("--max-batch", "--max-new-tokens", "--max-past"):
        with pytest.raises(SystemExit) as e:
            main(["build", str(tiny), "-o", str(tmp_path / "e"), option, "0", "--no-progress"])
        assert e.value.code == 2 and option in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_inspect_flags_tampered_and_missing_engines(tiny, tmp_path):
    out = tmp_path / "e"
    build_engine(tiny, out, quiet(archs=("sm80", "sm89")))
    with open(out / "engine.sm80.plan", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    report = inspect_engine_dir(out)
    assert [e["sha256_ok"] for e in report["engines"]] == [False, True]
    assert "does not match the manifest's sha256" in report["engines"][0]["reason"]
    assert len(report["problems"]) == 1 and "engine.sm80.plan: sha256" in report["problems"][0]
    (out / "engine.sm89.plan").unlink()
    with pytest.raises(MoecError, match="engine.sm89.plan is missing"):
        inspect_engine_dir(out)


class _SigintDisplay(ProgressDisplay):
    """Delivers a real SIGINT to this process from inside the build, as a terminal's Ctrl-C does."""

    def __init__(self):
        super().__init__(enabled=False)
        self.steps = 0

    def step(self, name, step):
        import signal

        self.steps += 1
        if self.steps == 2:
            signal.raise_signal(signal.SIGINT)


def test_cli_inspect_exits_non_zero_on_a_tampered_or_mismatched_engine(tiny, tmp_path, capsys):
    from moec.compiler.cli import main

    out = tmp_path / "e"
    build_engine(tiny, out, quiet(archs=("sm89",)))
    main(["inspect", str(out)])
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    edited = json.loads(json.dumps(manifest))
    edited["archs"], edited["engines"][0]["archs"], edited["trt"]["version"] = ["sm80"], ["sm80"], "1.5.0"
    (out / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "header says" in err and "(manifest: 1.5.0)" in err and "archs sm89 (manifest: sm80)" in err
    (out / "manifest.json").write_text(json.dumps(manifest))
    with open(out / "engine.sm89.plan", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(out), "--json"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "sha256" in captured.err
    assert json.loads(captured.out)["engines"][0]["sha256_ok"] is False


def test_sigint_during_build_cancels_through_the_monitor(tiny, tmp_path):
    import signal

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest was started in the background
    display = _SigintDisplay()
    with pytest.raises(KeyboardInterrupt):
        build_engine(tiny, tmp_path / "e", quiet(archs=("sm80", "sm89")), display=display)
    # The handler turned SIGINT into a cancel: TensorRT stopped at the next step, not at the end.
    assert display.steps == 2
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored after the build


def test_output_folder_holding_the_input_or_user_files_is_refused_before_work(tmp_path):
    """`moec build work/m.onnx -o work` would replace the folder that holds the model."""
    from moec.compiler.build import BuildConfig, build_engine

    work = tmp_path / "work"
    work.mkdir()
    model = work / "m.onnx"
    model.write_bytes(b"not even parsed: the output check comes first")
    (work / "README").write_text("keep")
    with pytest.raises(MoecError, match="holds the input"):
        build_engine(model, work, BuildConfig(progress=False))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(MoecError, match="choose a new or empty folder"):
        build_engine(model, other, BuildConfig(progress=False))
    with pytest.raises(MoecError, match="holds the input"):
        build_engine(model, tmp_path / "e", BuildConfig(progress=False, timing_cache=tmp_path / "e" / "tc.bin"))
    assert sorted(p.name for p in work.iterdir()) == ["README", "m.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "work"]
