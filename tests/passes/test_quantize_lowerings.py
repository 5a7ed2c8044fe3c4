"""The quantize pass and its lowerings on the demo export: fires (MatMulNBits per expert through the
split lowering for int4, QMoE for int8 and on --moe-lowering ort, MatMulNBits for dense int4,
DequantizeLinear where each belongs; int8 activations where asked), must not fire (fp8 experts on ort, the router, weights outside the scope, a
TensorRT target), same numbers (ONNX Runtime on the quantized graph equals ONNX Runtime on the export
with the dequantized weights put in by NumPy, to fp32 rounding)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from moec.common.errors import MoecError
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

sys.path.insert(0, str(Path(__file__).parent))
from conftest import demo_feeds, ort_run, rel_err  # noqa: E402
from quant_reference import dequantized_weights, optimize_dq_form, reference_model  # noqa: E402

CASES = {
    "int4-g32": dict(quantize="int4", quantize_group=32),
    "int4-g32-asym": dict(quantize="int4", quantize_group=32, quantize_symmetric=False),
    "int8": dict(quantize="int8"),
    "fp8": dict(quantize="fp8"),
}
# int8 activations at run time: not the dequantized reference's arithmetic (checked against it with
# the bound int8 rounding allows, not to fp32 rounding).
DYNAMIC = {"int4-g32-a8": dict(quantize="int4", quantize_group=32, quantize_activations="dynamic"),
           "int4-g32-asym-a8": dict(quantize="int4", quantize_group=32, quantize_symmetric=False,
                                    quantize_activations="dynamic")}


@pytest.fixture(scope="module")
def optimized(demo_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(case: str, target: str = "ort", scope: str = "all", **extra) -> Path:
        key = (case, target, scope, tuple(sorted(extra.items())))
        if key not in cache:
            tag = "_".join(f"{k}-{v}" for k, v in sorted(extra.items()))
            out = root / f"{case}_{target.replace(':', '_')}_{scope}{'_' + tag if tag else ''}" / "model.onnx"
            optimize_dq_form(demo_onnx, out, OptimizeConfig(target=target, quantize_scope=scope,
                                                            **(CASES | DYNAMIC)[case], **extra))
            cache[key] = out
        return cache[key]

    return get


def _ops(path: Path) -> Counter:
    return Counter((n.domain or "", n.op_type) for n in ir.load(path).graph)


def test_fires_matmulnbits_per_expert_for_int4(optimized):
    model = ir.load(optimized("int4-g32"))
    ops = Counter(n.op_type for n in model.graph)
    # 28 dense weights (below) + 2 MoE layers x 4 experts x (gate_up, down), float activations.
    assert ops["MatMulNBits"] == 28 + 16 and ops["QMoE"] == 0 and ops["DequantizeLinear"] == 0 and ops["MoE"] == 0
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert all("accuracy_level" not in n.attributes for n in nbits)
    expert = next(n for n in nbits if ".split0_nbits" in n.inputs[1].name and "gate_up" in n.inputs[1].name)
    attrs = {k: v.value for k, v in expert.attributes.items()}
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (64, 64, 4, 32)  # H 64, 2I 64
    assert list(expert.inputs[1].shape) == [64, 2, 16] and expert.inputs[1].dtype == ir.DataType.UINT8


def test_fires_qmoe_and_matmulnbits_for_int4_on_moe_lowering_ort(optimized):
    model = ir.load(optimized("int4-g32", moe_lowering="ort"))
    ops = Counter(n.op_type for n in model.graph)
    # 2 MoE layers; 4 layers x 4 attention + 2 dense MLPs x 3 + 2 shared experts x 3 = 28 dense weights.
    assert ops["QMoE"] == 2 and ops["MatMulNBits"] == 28 and ops["DequantizeLinear"] == 0 and ops["MoE"] == 0
    qmoe = next(n for n in model.graph if n.op_type == "QMoE")
    attrs = {k: v.value for k, v in qmoe.attributes.items()}
    assert attrs["expert_weight_bits"] == 4 and attrs["block_size"] == 32 and attrs["swiglu_fusion"] == 1
    assert qmoe.inputs[2].dtype == ir.DataType.UINT8 and list(qmoe.inputs[2].shape) == [4, 64, 32]  # [E, 2I, H/2]


def test_fires_qmoe_8bit_per_channel_and_dq_for_int8(optimized):
    model = ir.load(optimized("int8"))
    ops = Counter(n.op_type for n in model.graph)
    assert ops["QMoE"] == 2 and ops["DequantizeLinear"] == 28 and ops["MatMulNBits"] == 0
    qmoe = next(n for n in model.graph if n.op_type == "QMoE")
    assert qmoe.attributes["expert_weight_bits"].value == 8 and "block_size" not in qmoe.attributes
    assert list(qmoe.inputs[3].shape) == [4, 64]  # one scale per (expert, output row)


def test_must_not_fire_qmoe_for_fp8_experts(optimized):
    model = ir.load(optimized("fp8"))
    ops = Counter(n.op_type for n in model.graph)
    assert ops["QMoE"] == 0 and ops["MoE"] == 0 and ops["MatMulNBits"] == 0
    assert ops["If"] == 2  # hybrid over the DequantizeLinear (split refuses fp8 experts, as QMoE does)
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 32 and {n.inputs[0].dtype for n in dqs} == {ir.DataType.FLOAT8E4M3FN}


@pytest.mark.parametrize("case", list(CASES))
def test_routing_and_unscoped_weights_stay_full_precision(optimized, case):
    model = ir.load(optimized(case, scope="experts"))
    graph = model.graph
    routers = [v for name, v in graph.initializers.items() if "router" in name]
    assert len(routers) == 2 and all(v.dtype == ir.DataType.FLOAT for v in routers)
    assert all(u.node.op_type == "Gemm" for v in routers for u in v.uses())
    # Scope experts: the 4 expert weights only (int4: a MatMulNBits pair per expert and layer; int8:
    # inside QMoE; fp8: DequantizeLinear); attention and MLP weights keep their float initializers.
    want = {"int4-g32": 16, "int4-g32-asym": 16, "int8": 0, "fp8": 4}[case]
    assert sum(n.op_type in ("DequantizeLinear", "MatMulNBits") for n in graph) == want
    assert "model.layers.0.self_attn.q_proj.weight.T" in graph.initializers
    assert "model.layers.1.feed_forward.shared_expert.gate_proj.weight" in graph.initializers


@pytest.mark.parametrize("case", ["int4-g32", "fp8"])
def test_tensorrt_targets_keep_dequantizelinear(optimized, case):
    ops = _ops(optimized(case, "trt-rtx:sm89"))
    assert not any(domain == "com.microsoft" for domain, _ in ops)
    assert ops[("", "DequantizeLinear")] == 32


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("past,new", [(0, 6), (5, 1)])
def test_same_numbers_as_the_dequantized_reference(demo_onnx, optimized, case, past, new):
    ort_graph, trt_graph = optimized(case), optimized(case, "trt-rtx:sm89")
    reference = reference_model(demo_onnx, ir.load(trt_graph))
    feeds = demo_feeds(demo_onnx, past, new)
    want = ort_run(reference, feeds)
    for graph in (ort_graph, trt_graph):
        got = ort_run(graph, feeds)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-5, (graph.parent.name, rel_err(g, w))
    # The check can fail: quantization changes the logits well beyond that.
    assert rel_err(ort_run(demo_onnx, feeds)[0], want[0]) > 1e-3


def test_quantized_weights_are_what_the_quantizer_makes(demo_onnx, optimized):
    from moec.passes.quantize import dequantize, make_spec

    weights = dequantized_weights(ir.load(optimized("int4-g32", "trt-rtx:sm89")))
    source = ir.load(demo_onnx).graph.initializers
    w = source["model.layers.1.feed_forward.experts.gate_up_proj"].const_value.numpy()
    spec = make_spec("int4", 32)
    assert np.array_equal(weights["model.layers.1.feed_forward.experts.gate_up_proj"],
                          dequantize(spec.fmt.quantize(w, 1, 32, True)))


def test_group_longer_than_k_is_named(demo_onnx, tmp_path):
    with pytest.raises(MoecError, match=r"--quantize-group 128 is longer than model\.layers\.\d\.feed_forward\.experts"):
        optimize_onnx(demo_onnx, tmp_path / "out.onnx", OptimizeConfig(quantize="int4"))
    assert not (tmp_path / "out.onnx").exists()


def test_scope_naming_nothing_is_named(demo_onnx):
    from moec.passes.quantize import make_spec
    from moec.passes.quantize.apply import quantize_weights

    # Before the fusions there is no moec.GroupedExperts: the experts scope names nothing.
    with pytest.raises(MoecError, match="--quantize-scope experts names no weight"):
        quantize_weights(ir.load(demo_onnx), make_spec("int8"))


def test_fp8_on_an_arch_without_fp8_is_named_before_work(demo_onnx, tmp_path):
    with pytest.raises(MoecError, match="FP8 needs FP8 tensor cores .* sm86 has none"):
        optimize_onnx(demo_onnx, tmp_path / "out.onnx", OptimizeConfig(target="trt-rtx:sm86", quantize="fp8"))
    with pytest.raises(MoecError, match="--moe-lowering trt-plugin runs moec's TensorRT plugin"):
        optimize_onnx(demo_onnx, tmp_path / "out.onnx", OptimizeConfig(target="trt:sm90", quantize="int4",
                                                                       quantize_group=32, moe_lowering="trt-plugin"))


def test_sidecar_records_the_quantization(optimized):
    import json

    side = json.loads(optimized("int4-g32-asym").with_name("model.moec.json").read_text())
    q = side["quantization"]
    assert (q["format"], q["group_size"], q["symmetric"], q["scope"], q["weights"]) == ("int4", 32, False, "all", 32)
    assert q["calibration"].startswith("none") and q["routing"] == "full precision"


def test_opset_upgrade_keeps_the_fused_moec_ops(block_onnx):
    """The quantize pass upgrades an opset-20 graph (trt targets run no opset-23 fusion) to 21 for
    DequantizeLinear after the MoE fusions; onnxscript's converter inlines model-local functions,
    so the fused ops' bodies are held aside and rebuilt (passes/fusions/_graph.py: ensure_opset)."""
    from conftest import block_input

    from moec.passes.fusions._graph import ensure_opset
    from moec.passes.fusions.grouped_experts import fuse_grouped_experts
    from moec.passes.fusions.moe_gating import fuse_moe_gating

    path = block_onnx("ref_k1")
    model = ir.load(path)
    assert model.opset_imports[""] == 20 and fuse_moe_gating(model) == 1 and fuse_grouped_experts(model) == 1
    experts = next(n for n in model.graph if n.op_type == "GroupedExperts")
    assert ensure_opset(model, 21, "test", "DequantizeLinear", None, True)
    assert model.opset_imports[""] == 21 and experts.graph is model.graph
    assert sorted(n.op_type for n in model.graph if n.domain == "moec") == ["GroupedExperts", "MoEGating"]
    assert {f.opset_imports[""] for f in model.functions.values()} == {21}
    feeds = block_input()
    assert rel_err(ort_run(model, feeds)[0], ort_run(path, feeds)[0]) < 1e-6


@pytest.mark.parametrize("target,case", [("trt:sm90", "int4-g32"), ("trt:sm90", "int8"), ("trt:sm90", "fp8"),
                                         ("trt:sm100", "int4-g32"), ("trt:sm100", "int8")])
def test_trt_targets_quantize_the_fused_experts(demo_onnx, optimized, target, case):
    """Full TensorRT targets keep the export's opset 20 through the fusions; quantizing then crashed
    on a GroupedExperts node the opset upgrade had inlined away. The graph is hybrid over
    DequantizeLinear experts (sm100: TRT_MoE takes float or FP8 experts, so int4 / int8 fall back;
    its FP8 form is tests/passes/test_trt_native_fp8.py) and computes the dequantized reference's
    numbers on ONNX Runtime, prefill and decode."""
    graph = optimized(case, target, "experts")
    ops = _ops(graph)
    assert ops[("", "DequantizeLinear")] == 4 and ops[("", "If")] == 2
    assert not any(domain == "moec" for domain, _ in ops)
    reference = reference_model(demo_onnx, ir.load(graph))
    for past, new in ((0, 6), (5, 1)):
        feeds = demo_feeds(demo_onnx, past, new)
        got, want = ort_run(graph, feeds), ort_run(reference, feeds)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-5, (case, target, past, rel_err(g, w))


@pytest.mark.trt
@pytest.mark.parametrize("case", ["int4-g32", "fp8"])
def test_trt_sm90_quantized_graph_parses(optimized, case):
    """TensorRT-RTX's ONNX parser (full TensorRT cannot be installed here) takes the trt:sm90
    graph, its DequantizeLinear weights included."""
    trt = pytest.importorskip("tensorrt_rtx")
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(optimized(case, "trt:sm90", "experts"))), \
        [parser.get_error(i).desc() for i in range(parser.num_errors)]
    layers = [network.get_layer(i).type for i in range(network.num_layers)]
    assert layers.count(trt.LayerType.DEQUANTIZE) >= 4 and trt.LayerType.CONDITION in layers


@pytest.mark.parametrize("case", list(DYNAMIC))
def test_fires_int8_activations_on_every_matmulnbits(optimized, case):
    model = ir.load(optimized(case))
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 28 + 16 and all(n.attributes["accuracy_level"].value == 4 for n in nbits)
    side = json.loads(optimized(case).with_name("model.moec.json").read_text())
    assert side["quantization"]["activations"].startswith("int8 dynamic")


@pytest.mark.parametrize("case", list(DYNAMIC))
@pytest.mark.parametrize("past,new", [(0, 6), (5, 1)])
def test_int8_activations_cost_less_than_the_int4_weights(demo_onnx, optimized, case, past, new):
    """Dynamic int8 activations round each row's block of the weight's group to 255 levels, a finer
    grid than int4's 15 on the weights: the logits move from the exact dequantized arithmetic by
    less than the int4 weights themselves moved them from fp32, and not by nothing (the attribute
    took effect)."""
    reference = reference_model(demo_onnx, ir.load(optimized(case.removesuffix("-a8"), "trt-rtx:sm89")))
    feeds = demo_feeds(demo_onnx, past, new)
    want = ort_run(reference, feeds)[0]
    got = ort_run(optimized(case), feeds)[0]
    weights_cost = rel_err(ort_run(demo_onnx, feeds)[0], want)
    assert 1e-6 < rel_err(got, want) < weights_cost, (rel_err(got, want), weights_cost)


def test_int8_activations_are_refused_where_they_cannot_run(demo_onnx, tmp_path):
    a8 = dict(quantize="int4", quantize_activations="dynamic")
    with pytest.raises(MoecError, match="target trt-rtx:sm89 runs int4 weights with float activations"):
        optimize_onnx(demo_onnx, tmp_path / "a.onnx", OptimizeConfig(target="trt-rtx:sm89", **a8))
    with pytest.raises(MoecError, match="com.microsoft.QMoE .* has no int8-activation mode"):
        optimize_onnx(demo_onnx, tmp_path / "b.onnx", OptimizeConfig(target="ort", moe_lowering="ort", **a8))
    with pytest.raises(MoecError, match="dynamic: int8 activations at run time go with --quantize int4"):
        optimize_onnx(demo_onnx, tmp_path / "c.onnx", OptimizeConfig(target="ort", quantize="int8",
                                                                     quantize_activations="dynamic"))
    with pytest.raises(MoecError, match="--moe-lowering split runs quantized experts as MatMulNBits, int4 only"):
        optimize_onnx(demo_onnx, tmp_path / "d.onnx", OptimizeConfig(target="ort", moe_lowering="split", quantize="int8"))
    assert not list(tmp_path.iterdir())
