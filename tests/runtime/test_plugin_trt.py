"""moec's TensorRT plugin: its enqueue body, its creator, and what TensorRT for RTX does with it.

No TensorRT engine can execute on this project's machines (shared/FACTS.md), so the enqueue body
(``run_grouped_experts``) is tested on CPU tensors, where the op runs its CPU fallback.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from moec.common.contract import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from moec.common.errors import MoecError
from moec.runtime import trt_plugin
from moec.runtime.kernels.reference import grouped_experts_reference, random_inputs


@pytest.mark.parametrize("score_on_input", [True, False])
def test_enqueue_body_flattens_tokens_and_writes_the_output(score_on_input):
    x, ids, scores, w1, w2 = random_inputs(6, 8, 2, 16, 8, torch.bfloat16)
    out = torch.full((2, 3, 16), float("nan"), dtype=torch.bfloat16)
    trt_plugin.run_grouped_experts(
        x.view(2, 3, 16), ids.int().view(2, 3, 2), scores.view(2, 3, 2), w1, w2, out, score_on_input
    )
    ref = grouped_experts_reference(x, ids, scores, w1, w2, score_on_input)
    assert torch.equal(out.view(6, 16), ref)


def test_plugin_identity_is_the_contract():
    assert trt_plugin.plugin_identity() == (PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)


# --- TensorRT for RTX -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_rtx():
    return pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed")


@pytest.mark.trt
def test_register_refuses_tensorrt_rtx_with_a_moec_error(trt_rtx):
    with pytest.raises(MoecError, match="TensorRT for RTX aborts the process"):
        trt_plugin.register_plugin(trt_rtx)
    assert trt_plugin.plugin_identity() not in trt_plugin.plugins_available(trt_rtx)


@pytest.mark.trt
def test_plugins_available_lists_registry_triples(trt_rtx):
    available = trt_plugin.plugins_available(trt_rtx)
    assert isinstance(available, set)
    assert all(isinstance(p, tuple) and len(p) == 3 and all(isinstance(s, str) for s in p) for p in available)


@pytest.mark.trt
def test_creator_reads_and_serializes_score_on_input(trt_rtx):
    plugin_cls, creator_cls = trt_plugin._plugin_classes(trt_rtx)
    creator = creator_cls()
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == trt_plugin.plugin_identity()
    fields = trt_rtx.PluginFieldCollection([
        trt_rtx.PluginField("score_on_input", np.array([0], dtype=np.int32), trt_rtx.PluginFieldType.INT32)
    ])
    plugin = creator.create_plugin("moe0", fields, trt_rtx.TensorRTPhase.BUILD)
    assert isinstance(plugin, plugin_cls) and plugin.score_on_input == 0
    assert plugin.clone().score_on_input == 0
    (field,) = plugin.get_fields_to_serialize()
    assert field.name == "score_on_input" and int(np.asarray(field.data)[0]) == 0
    default = creator.create_plugin("moe1", trt_rtx.PluginFieldCollection([]), trt_rtx.TensorRTPhase.BUILD)
    assert default.score_on_input == 1
    bad = trt_rtx.PluginFieldCollection([
        trt_rtx.PluginField("score_on_input", np.array([2], dtype=np.int32), trt_rtx.PluginFieldType.INT32)
    ])
    with pytest.raises(MoecError, match="score_on_input must be 0 or 1"):
        creator.create_plugin("moe2", bad, trt_rtx.TensorRTPhase.BUILD)


# The experiment: one plugin node as the trt-plugin lowering emits it, the plugin force-registered,
# parsed and built for sm89 on the CPU. Run in a child process because TensorRT-RTX aborts it.
_BUILD_SM89 = textwrap.dedent(
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    import tensorrt_rtx as trt
    from moec.common import contract as c
    from moec.runtime import trt_plugin

    trt_plugin.register_plugin(trt, force=True)
    H, I, E, K = 16, 8, 4, 1
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((E, H, 2 * I)).astype(np.float16), "w_gate_up_EHI2"),
        numpy_helper.from_array(rng.standard_normal((E, I, H)).astype(np.float16), "w_down_EIH"),
    ]
    node = helper.make_node(
        c.PLUGIN_NAME, ["hidden_TH", "expert_ids_TK", "scores_TK", "w_gate_up_EHI2", "w_down_EIH"], ["out_TH"],
        domain=c.PLUGIN_NAMESPACE, plugin_version=c.PLUGIN_VERSION, plugin_namespace=c.PLUGIN_NAMESPACE,
        score_on_input=1,
    )
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("hidden_TH", TensorProto.FLOAT16, ["T", H]),
         helper.make_tensor_value_info("expert_ids_TK", TensorProto.INT32, ["T", K]),
         helper.make_tensor_value_info("scores_TK", TensorProto.FLOAT16, ["T", K])],
        [helper.make_tensor_value_info("out_TH", TensorProto.FLOAT16, ["T", H])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(c.PLUGIN_NAMESPACE, 1)])
    logger = trt.Logger(trt.Logger.INFO)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    print("PARSE", flush=True)
    ok = parser.parse(model.SerializeToString())
    print("PARSED", ok, [parser.get_error(i).desc() for i in range(parser.num_errors)], flush=True)
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM89, 0)
    profile = builder.create_optimization_profile()
    for name, width in (("hidden_TH", H), ("expert_ids_TK", K), ("scores_TK", K)):
        profile.set_shape(name, (1, width), (4, width), (16, width))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    print("ENGINE_BYTES", 0 if engine is None else engine.nbytes, flush=True)
    """
)


@pytest.mark.trt
def test_tensorrt_rtx_aborts_when_parsing_a_python_plugin_node(trt_rtx):
    """Records TensorRT-RTX 1.7's refusal verbatim. If this fails because an engine was built, RTX
    has started accepting Python plugins: turn this into a test of the sm89 plugin engine and let
    register_plugin accept tensorrt_rtx."""
    proc = subprocess.run([sys.executable, "-c", _BUILD_SM89], capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert "ENGINE_BYTES" not in proc.stdout, f"TensorRT-RTX built a plugin engine now:\n{log[-2000:]}"
    assert "PARSE" in proc.stdout and "PARSED" not in proc.stdout
    assert f"Successfully created plugin: {PLUGIN_NAME}" in log
    assert "terminate called without an active exception" in proc.stderr
    assert proc.returncode == -6  # SIGABRT


# --- quickly deployable plugin ----------------------------------------------------------------


def test_quickly_deployable_needs_full_tensorrt():
    try:
        import tensorrt.plugin  # noqa: F401
    except ImportError:
        assert trt_plugin.register_quickly_deployable() is False
    else:
        pytest.skip("full TensorRT with tensorrt.plugin is installed: exercise the QDP path on a GPU host")
