"""moec optimize / optimize_onnx on the demo export: every ORT-runnable lowering gives torch's
greedy tokens; the report, sidecar, external data, dumps and bad inputs."""

from __future__ import annotations

import json
import re
import shutil

import onnx_ir as ir
import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler.pipeline import OptimizeConfig, Step, _Context, optimize_onnx, run_passes
from moec_cli import run_cli

PROMPT = [[256, 10, 20, 30, 40, 50, 60, 70, 80]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def torch_tokens(demo_ckpt):
    from moec.models.torch_backend import TorchBackend
    from moec.runtime.generate import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    return generate(TorchBackend.from_checkpoint(demo_ckpt), PROMPT, cfg).new_tokens


def ort_tokens(path, graph_optimization=True):
    from moec.runtime.generate import GenerationConfig, generate
    from moec.runtime.ort_backend import OrtBackend

    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    return generate(OrtBackend.from_onnx(path, graph_optimization=graph_optimization), PROMPT, cfg).new_tokens


@pytest.mark.parametrize("lowering", [None, "ort", "split", "gather", "dense", "hybrid", "function"])
def test_lowerings_give_torch_greedy_tokens(demo_onnx, torch_tokens, tmp_path, lowering):
    out = tmp_path / "opt" / "model.onnx"
    report = optimize_onnx(demo_onnx, out, OptimizeConfig(target="ort", moe_lowering=lowering))
    assert report.fused_gating == report.fused_experts == report.moe_layers == 2
    assert report.moe_lowering == {lowering or "split": 2}  # split: the ort target's default
    assert not report.warnings
    model = ir.load(out)
    ops = {n.op_type for n in model.graph}
    assert "ScatterElements" not in ops or lowering == "dense"  # the dense score matrix is gone
    assert ort_tokens(out) == torch_tokens
    side = json.loads(contract.sidecar_path(out).read_text())
    assert side["moe_lowering"] == (lowering or "split") and side["target"] == "ort" and side["precision"] == "fp32"
    assert (out.parent / contract.TOKENIZER_FILE).read_bytes() == (demo_onnx.parent / contract.TOKENIZER_FILE).read_bytes()
    matches = {r.name: r.matches for r in report.passes}
    assert {"fold_constants", "fuse_moe_gating", "fuse_grouped_experts", "lower_moe"} <= set(matches)
    # ort: every norm, RoPE application and attention core goes to a standard opset-23 op.
    assert (matches["fuse_rms_norm"], matches["fuse_rotary"], matches["fuse_attention"]) == (9, 6, 4)


# The attention mask's fill (float32 min) once overflowed to -inf in the cast ("overflow encountered
# in cast"): a RuntimeWarning is an error here.
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_fp16_precision_keeps_routing_fp32_and_numbers(demo_onnx, demo_ckpt, tmp_path):
    import numpy as np
    import torch

    import lowprec

    out = tmp_path / "fp16" / "model.onnx"
    report = optimize_onnx(demo_onnx, out, OptimizeConfig(target="ort", moe_lowering="gather", precision="fp16"))
    assert report.precision == "fp16"
    model = ir.load(out)
    fills = [n.inputs[2] for n in model.graph if n.op_type == "Where" and n.outputs[0].dtype == ir.DataType.FLOAT16]
    assert fills and all(ir.convenience.get_const_tensor(v).numpy().min() == np.finfo(np.float16).min for v in fills)
    topks = [n for n in model.graph if n.op_type == "TopK"]
    assert len(topks) == 2 and all(n.inputs[0].dtype == ir.DataType.FLOAT for n in topks)
    weights = [v for v in model.graph.initializers.values() if v.name.endswith("gate_up_proj")]
    assert weights and all(v.dtype == ir.DataType.FLOAT16 for v in weights)
    # The graph I/O keeps fp32 (runtime contract), and its numbers are as close to fp32 torch as
    # torch fp16's are (tests/lowprec.py: greedy tokens could flip at a near-tie on another CPU).
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT
    ids = np.array(PROMPT)
    pos = np.arange(ids.shape[1])[None]
    tokens = lowprec.decode_tokens(demo_ckpt, ids, pos, NEW_TOKENS)
    fp32 = lowprec.torch_logits(demo_ckpt, torch.float32, ids, pos, tokens)
    fp16 = lowprec.torch_logits(demo_ckpt, torch.float16, ids, pos, tokens)
    got = lowprec.ort_logits(out, ids, pos, tokens, graph_optimization=False)
    lowprec.assert_as_close_as_torch(got, fp16, fp32, "fp16-precision graph on ONNX Runtime")


def test_bf16_precision_structure(demo_onnx, tmp_path):
    # ONNX Runtime's CPU provider has no bf16 MatMul, so bf16 is checked by structure only.
    out = tmp_path / "bf16" / "model.onnx"
    optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt:sm90", precision="bf16"))
    model = ir.load(out)
    mats = [n for n in model.graph if n.op_type == "MatMul"]
    assert mats and all(n.inputs[0].dtype == ir.DataType.BFLOAT16 for n in mats)
    floats = [v for v in model.graph.initializers.values() if v.dtype in (ir.DataType.FLOAT, ir.DataType.BFLOAT16) and v.const_value.size > 1]
    floats = [v for v in floats if "inv_freq" not in v.name]  # RoPE frequencies are positional: fp32
    assert floats and all(v.dtype == ir.DataType.BFLOAT16 for v in floats)
    assert all(n.inputs[0].dtype == ir.DataType.FLOAT for n in model.graph if n.op_type == "TopK")


@pytest.mark.parametrize("target,lowering,precision", [
    ("ort", "ort", None), ("ort", "gather", None), ("ort", "dense", None), ("ort", "hybrid", None),
    ("ort", "function", None), ("ort", "gather", "fp16"), ("trt:sm100", "trt-native", None),
    ("trt:sm89", "trt-plugin", None), ("trt-rtx:sm89", None, "bf16"),
])
def test_every_value_of_an_optimized_graph_has_a_dtype(demo_onnx, tmp_path, target, lowering, precision):
    from moec.passes.cleanup import untyped_values

    out = tmp_path / "typed" / "model.onnx"
    report = optimize_onnx(demo_onnx, out, OptimizeConfig(target=target, moe_lowering=lowering, precision=precision))
    assert not report.warnings
    model = ir.load(out)  # as written, subgraphs (hybrid's If branches) included
    assert [v.name for v in untyped_values(model)] == []
    assert {r.name: r.matches for r in report.passes}["infer_types"] > 0


def test_external_data_stays_external(demo_onnx, torch_tokens, tmp_path):
    src = tmp_path / "ext" / "model.onnx"
    src.parent.mkdir()
    ir.save(ir.load(demo_onnx), src, external_data="model.onnx.data", size_threshold_bytes=0)
    for f in (contract.sidecar_path(demo_onnx), demo_onnx.parent / contract.TOKENIZER_FILE):
        shutil.copy(f, src.parent / f.name.replace(demo_onnx.stem, src.stem))
    out = tmp_path / "ext_out" / "model.onnx"
    optimize_onnx(src, out, OptimizeConfig(target="ort", moe_lowering="ort"))
    data = out.with_name("model.onnx.data")
    assert data.exists() and data.stat().st_size > out.stat().st_size
    assert ort_tokens(out) == torch_tokens
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_dump_dir_and_report(demo_onnx, tmp_path):
    dump = tmp_path / "dump"
    report = optimize_onnx(demo_onnx, tmp_path / "o" / "model.onnx", OptimizeConfig(target="trt:sm89", dump_dir=dump))
    stems = sorted(p.stem for p in dump.glob("*.onnx"))
    assert stems == ["00_input", "01_cleanup", "02_fusion", "03_lowering", "04_cleanup"]
    assert report.moe_lowering == {"hybrid": 2}
    json.dumps(report.to_dict())


def test_dumps_are_graph_only_and_leave_the_output_whole(demo_onnx, torch_tokens, tmp_path):
    import onnx

    from moec.compiler.pipeline import DUMP_INLINE_LIMIT_BYTES

    dump, out = tmp_path / "dump", tmp_path / "o" / "model.onnx"
    optimize_onnx(demo_onnx, out, OptimizeConfig(target="ort", moe_lowering="gather", dump_dir=dump))
    assert sorted(p.name for p in dump.iterdir()) == [".moec-output.json"] + [f"{s}.onnx" for s in ("00_input", "01_cleanup", "02_fusion", "03_lowering", "04_cleanup")]
    weights = {v.name: v for v in ir.load(demo_onnx).graph.initializers.values() if v.const_value.nbytes > DUMP_INLINE_LIMIT_BYTES}
    for path in dump.glob("*.onnx"):
        proto = onnx.load(path, load_external_data=False)
        assert all(t.ByteSize() <= 2 * DUMP_INLINE_LIMIT_BYTES for t in proto.graph.initializer), path.name
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    # What the input dump saves is the weights' bytes (the rest is the graph and the exporter's metadata).
    saved = demo_onnx.stat().st_size - (dump / "00_input.onnx").stat().st_size
    assert saved >= 0.95 * sum(w.const_value.nbytes for w in weights.values())
    # The input dump keeps every weight as a typed graph input.
    inputs = {v.name: v for v in ir.load(dump / "00_input.onnx").graph.inputs}
    assert all(inputs[n].dtype == w.dtype and inputs[n].shape == w.shape for n, w in weights.items())
    # The weights were put back: the output holds them and gives torch's tokens.
    assert {v.name for v in ir.load(out).graph.inputs} == {v.name for v in ir.load(demo_onnx).graph.inputs}
    assert ort_tokens(out) == torch_tokens


def test_no_moe_pattern_is_reported_not_an_error(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "passes"))
    import moe_blocks as mb

    src = mb.export_block(mb.SwiGLU(16, 24), tmp_path / "mlp.onnx", hidden=16)
    with pytest.warns(UserWarning, match="no MoE layer was fused"):
        report = optimize_onnx(src, tmp_path / "out" / "mlp.onnx", OptimizeConfig())
    assert report.fused_experts == 0 and report.warnings
    with pytest.raises(MoecError, match="require-fusion"):
        optimize_onnx(src, tmp_path / "out2" / "mlp.onnx", OptimizeConfig(require_fusion=True))
    assert not (tmp_path / "out2" / "mlp.onnx").exists()


@pytest.mark.parametrize("config,match", [
    (OptimizeConfig(target="cuda"), "unknown target"),
    (OptimizeConfig(target="trt:sm89", moe_lowering="trt-native"), "target trt:sm89: MoE lowering 'trt-native'"),
    (OptimizeConfig(precision="fp8"), "precision"),
])
def test_bad_config_is_a_moec_error(demo_onnx, tmp_path, config, match):
    with pytest.raises(MoecError, match=match):
        optimize_onnx(demo_onnx, tmp_path / "x.onnx", config)
    assert not (tmp_path / "x.onnx").exists()


def test_bad_inputs(tmp_path):
    with pytest.raises(MoecError, match="no such ONNX file"):
        optimize_onnx(tmp_path / "missing.onnx", tmp_path / "o.onnx", OptimizeConfig())
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(MoecError, match="not a readable ONNX model"):
        optimize_onnx(junk, tmp_path / "o.onnx", OptimizeConfig())


def test_pass_manager_names_the_failing_pass():
    def broken(model, ctx):
        raise ValueError("boom")

    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}), ir_version=10)
    ctx = _Context(OptimizeConfig(), None, None)
    with pytest.raises(RuntimeError, match="broken_pass.*boom"):
        run_passes(model, [Step("fusion", "broken_pass", broken)], ctx)

    def refusing(model, ctx):
        raise MoecError("node x: cannot")

    with pytest.raises(MoecError, match="pass refusing_pass"):
        run_passes(model, [Step("lowering", "refusing_pass", refusing)], ctx)


def test_repeat_runs_until_no_change():
    calls = []

    def shrinking(model, ctx):
        calls.append(1)
        return 3 - len(calls) if len(calls) < 3 else 0

    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}), ir_version=10)
    ctx = _Context(OptimizeConfig(cleanup_iterations=5), None, None)
    (rec,) = run_passes(model, [Step("cleanup", "shrink", shrinking, repeat=True)], ctx)
    assert len(calls) == 3 and rec.matches == 3


def test_cli_optimize_prints_table_and_writes_report(demo_onnx, tmp_path, capsys):
    from moec.compiler.cli import main

    out, rep = tmp_path / "cli" / "model.onnx", tmp_path / "r.json"
    main(["optimize", str(demo_onnx), "-o", str(out), "--target", "trt-rtx:sm89", "--json-out", str(rep)])
    text = capsys.readouterr().out
    assert "fuse_grouped_experts" in text and "matches" in text
    report = json.loads(rep.read_text())
    assert report["fused_experts"] == 2 and report["moe_lowering"] == {"hybrid": 2}
    with pytest.raises(SystemExit) as e:
        main(["optimize", str(demo_onnx), "-o", str(out), "--target", "trt:sm89", "--moe-lowering", "ort"])
    assert e.value.code == 2
    assert "target trt:sm89" in capsys.readouterr().err


def _cli_tokens(artifact, backend, capsys):
    from moec.compiler.cli import main

    main(["run", str(artifact), "--backend", backend, "--prompt-ids", " ".join(map(str, PROMPT[0])),
          "--max-new-tokens", str(NEW_TOKENS), "--json"])
    return json.loads(capsys.readouterr().out)["new_tokens"]


def test_moec_run_ort_on_optimized_graphs_matches_torch(demo_ckpt, demo_onnx, tmp_path, capsys):
    from moec.compiler.cli import main

    expected = _cli_tokens(demo_ckpt, "torch", capsys)
    for lowering in ("ort", "gather", "dense", "hybrid", "function"):
        out = tmp_path / lowering / "model.onnx"
        main(["optimize", str(demo_onnx), "-o", str(out), "--target", "ort", "--moe-lowering", lowering])
        capsys.readouterr()
        assert _cli_tokens(out, "ort", capsys) == expected, lowering


def test_fp16_export_fuses(demo_ckpt, tmp_path):
    from moec.compiler.export import ExportConfig, export_onnx

    src = tmp_path / "fp16" / "model.onnx"
    export_onnx(demo_ckpt, src, ExportConfig(dtype="fp16"))
    report = optimize_onnx(src, tmp_path / "opt" / "model.onnx", OptimizeConfig(target="ort", moe_lowering="gather"))
    assert report.fused_gating == report.fused_experts == 2 and report.precision == "fp16"
    assert ort_tokens(tmp_path / "opt" / "model.onnx") == ort_tokens(src)
    # The export's fp32 softmax (Cast, Softmax, Cast) becomes Attention's softmax_precision=FLOAT.
    matches = {r.name: r.matches for r in report.passes}
    assert (matches["fuse_rotary"], matches["fuse_attention"]) == (6, 4)
    attns = [n for n in ir.load(tmp_path / "opt" / "model.onnx").graph if n.op_type == "Attention"]
    assert [a.attributes.get_int("softmax_precision") for a in attns] == [int(ir.DataType.FLOAT)] * 4


@pytest.mark.trt
def test_tensorrt_rtx_parses_the_default_trt_rtx_graph(demo_onnx, tmp_path):
    trt = pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "rtx" / "model.onnx"
    report = optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt-rtx:sm89"))
    assert report.moe_lowering == {"hybrid": 2}
    assert {r.name: r.matches for r in report.passes}["fuse_rms_norm"] == 9
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(out)), [parser.get_error(i).desc() for i in range(parser.num_errors)]


def _external_copy(demo_onnx, folder):
    src = folder / "model.onnx"
    folder.mkdir()
    ir.save(ir.load(demo_onnx), src, external_data="model.onnx.data", size_threshold_bytes=0)
    for f in (contract.sidecar_path(demo_onnx), demo_onnx.parent / contract.TOKENIZER_FILE):
        shutil.copy(f, folder / f.name.replace(demo_onnx.stem, src.stem))
    return src


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_unusable_external_data_is_refused_before_work(demo_onnx, tmp_path, damage):
    src = _external_copy(demo_onnx, tmp_path / "ext")
    data = src.with_name("model.onnx.data")
    if damage == "missing":
        data.unlink()
    else:
        with open(data, "r+b") as f:
            f.truncate(1000)
    out, dump = tmp_path / "out" / "model.onnx", tmp_path / "dump"
    expected = "(missing)" if damage == "missing" else "(has 1000 bytes, the graph needs"
    with pytest.raises(MoecError, match=re.escape(str(data)) + ".*" + re.escape(expected)):
        optimize_onnx(src, out, OptimizeConfig(target="ort", dump_dir=dump))
    assert not out.parent.exists() and not dump.exists()  # refused before any work


@pytest.mark.parametrize("where", ["report", "out", "dump"])
def test_unwritable_outputs_are_refused_before_work(demo_onnx, tmp_path, capsys, where):
    # A regular file as a parent folder cannot be written under, root or not.
    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    out, rep, dump = tmp_path / "o" / "model.onnx", tmp_path / "r.json", tmp_path / "dump"
    bad = blocker / "sub" / "x.json"
    argv = ["optimize", str(demo_onnx), "-o", str(bad if where == "out" else out), "--json-out",
            str(bad if where == "report" else rep), "--dump-dir", str(bad if where == "dump" else dump)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and f"cannot write {bad}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written, not even folders


def test_report_may_not_overwrite_the_model(demo_onnx, tmp_path, capsys):
    src = _external_copy(demo_onnx, tmp_path / "ext")
    out = tmp_path / "o" / "model.onnx"
    for victim in (src, src.with_name("model.onnx.data"), contract.sidecar_path(src), out, contract.sidecar_path(out)):
        before = victim.read_bytes() if victim.exists() else None
        code, _, err = run_cli(["optimize", str(src), "-o", str(out), "--json-out", str(victim)], capsys)
        assert code == 2 and "--json-out" in err, victim
        assert (victim.read_bytes() if victim.exists() else None) == before
    assert not out.parent.exists()


def test_an_optimized_graph_is_not_optimized_for_another_target(demo_onnx, tmp_path):
    first = tmp_path / "rtx" / "model.opt.onnx"
    optimize_onnx(demo_onnx, first, OptimizeConfig(target="trt-rtx:sm89"))
    with pytest.raises(MoecError, match=r"already optimized for trt-rtx:sm89 \(hybrid\); optimize the export"):
        optimize_onnx(first, tmp_path / "ort" / "model.onnx", OptimizeConfig(target="ort"))
    assert not (tmp_path / "ort").exists()
    # The same target again is a no-op that still works.
    again = optimize_onnx(first, tmp_path / "again" / "model.onnx", OptimizeConfig(target="trt-rtx:sm89"))
    assert again.fused_experts == 0 and again.moe_lowering == {}
    # Without a sidecar the lowered MoE nodes in the graph still show it.
    bare = tmp_path / "bare" / "model.onnx"
    bare.parent.mkdir()
    shutil.copy(first, bare)
    with pytest.raises(MoecError, match=r"already optimized \(its graph has lowered MoE layers: moe_hybrid_0"):
        optimize_onnx(bare, tmp_path / "ort2" / "model.onnx", OptimizeConfig(target="ort"))


def test_dumps_of_an_external_data_model_are_self_contained(demo_onnx, tmp_path):
    import onnx

    from moec.compiler.pipeline import DUMP_INLINE_LIMIT_BYTES

    # Every tensor external, including ones of exactly the inline limit (the router weights of the
    # demo are 1024 bytes) and the small shape constants.
    src = _external_copy(demo_onnx, tmp_path / "ext")
    sizes = {v.name: v.const_value.nbytes for v in ir.load(src).graph.initializers.values()}
    assert DUMP_INLINE_LIMIT_BYTES in sizes.values()
    dump = tmp_path / "dump"
    optimize_onnx(src, tmp_path / "o" / "model.onnx", OptimizeConfig(target="trt-rtx:sm89", dump_dir=dump))
    for path in sorted(dump.glob("*.onnx")):
        onnx.checker.check_model(str(path))
        proto = onnx.load(path, load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer), path.name


def _rtx_builds_sm89(onnx_path, max_batch, max_new_tokens):
    """Build ``onnx_path`` with TensorRT-RTX for sm89 (on the CPU) over one profile; None when it
    builds, else the builder's errors."""
    trt = pytest.importorskip("tensorrt_rtx")

    class Errors(trt.ILogger):
        def __init__(self):
            super().__init__()
            self.lines = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.ERROR:
                self.lines.append(msg)

    logger = Errors()
    builder = trt.Builder(logger)
    network = builder.create_network(int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(trt.ComputeCapability.SM89, 0)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name in (contract.INPUT_IDS, contract.POSITION_IDS):
            profile.set_shape(t.name, (1, 1), (1, 1), (max_batch, max_new_tokens))
        else:  # past key/value [B, KVH, P, D]; a chunked layer's ring has a fixed slot axis
            _, kvh, slots, d = t.shape
            lo, opt, hi = (0, 8, 24) if slots < 0 else (slots,) * 3
            profile.set_shape(t.name, (1, kvh, lo, d), (1, kvh, opt, d), (max_batch, kvh, hi, d))
    cfg.add_optimization_profile(profile)
    return None if builder.build_serialized_network(network, cfg) is not None else logger.lines


@pytest.mark.trt
def test_gather_for_trt_rtx_builds_with_batch_over_one(demo_onnx, tmp_path):
    out = tmp_path / "g" / "model.onnx"
    report = optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt-rtx:sm89", moe_lowering="gather"))
    assert report.moe_lowering == {"gather": 2}
    assert "fuse_rotary" not in {r.name for r in report.passes}  # the RoPE ops stay (see _fusion_steps)
    assert _rtx_builds_sm89(out, max_batch=2, max_new_tokens=8) is None
    # What the RoPE ops are kept for: with RotaryEmbedding, TensorRT-RTX 1.7 fails this build.
    forced = tmp_path / "f" / "model.onnx"
    optimize_onnx(demo_onnx, forced, OptimizeConfig(target="trt-rtx:sm89", moe_lowering="gather", fuse_rotary=True))
    errors = _rtx_builds_sm89(forced, max_batch=2, max_new_tokens=8)
    if errors is None:
        pytest.fail("TensorRT-RTX now builds gather with RotaryEmbedding: fuse it again for trt-rtx gather")
    assert any("ssa_validation" in e for e in errors), errors
