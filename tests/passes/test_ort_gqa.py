"""fuse_ort_gqa: fires, must not fire (each refusal), same numbers on ONNX Runtime.

Two tiny configs: the demo (chunks of 8, 512 positions: its 3 chunked layers' rings wrap, so only
the NoPE layer 3, with temperature tuning, is rewritten) and the demo with chunks of 32 over 32
positions (no ring wraps: all 4 layers, 3 with the QK norm)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import ort_run, rel_err

from moec.common import contract
from moec.passes.fusions._graph import FusionLog
from moec.passes.fusions.attention import fuse_attention
from moec.passes.fusions.qk_norm import fuse_qk_norm
from moec.passes.fusions.rotary import fuse_rotary
from moec.passes.lowerings.ort_gqa import GqaLayout, fuse_ort_gqa

WIDE = 32  # chunk = max positions of the second config


@pytest.fixture(scope="module")
def wide_onnx(tmp_path_factory):
    """The demo model with attention chunks of 32 over 32 positions: no ring wraps."""
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.models import Llama4Config
    from moec.models.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("wide")
    config = Llama4Config.preset("llama4-tiny").replace(attention_chunk_size=WIDE, max_position_embeddings=WIDE)
    write_demo_checkpoint(root / "ckpt", preset=config, seed=0)
    export_onnx(root / "ckpt", root / "model.onnx", ExportConfig(dtype="fp32"))
    return root / "model.onnx"


def _fused(path) -> ir.Model:
    """The graph fuse_ort_gqa meets in the pipeline: clean-up, then rotary, QK norm and attention fused."""
    from moec.passes import cleanup

    model = ir.load(path)
    for _ in range(2):
        for p in cleanup.CLEANUP_PASSES:
            p(model)
    fuse_rotary(model)
    fuse_qk_norm(model)
    fuse_attention(model)
    return model


def _layout(path) -> GqaLayout:
    """The layout of the export at ``path``, from its sidecar (the clean-up fixtures have none)."""
    return GqaLayout.from_sidecar(json.loads(contract.sidecar_path(path).read_text()))


def _feeds(model: ir.Model, past: int, new: int, batch: int, seed: int = 0) -> dict:
    """Inputs of ``new`` tokens after ``past`` cached ones; a ring holds position p at slot p (no wrap here)."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, 250, (batch, new)).astype(np.int64),
             "position_ids": np.tile(np.arange(past, past + new), (batch, 1)).astype(np.int64)}
    for v in model.graph.inputs[2:]:
        slots = v.shape[2] if isinstance(v.shape[2], int) else past
        cache = np.zeros((batch, v.shape[1], slots, v.shape[3]), np.float32)
        cache[:, :, :past] = rng.standard_normal((batch, v.shape[1], past, v.shape[3]))
        feeds[v.name] = cache
    return feeds


def test_gqa_fires_on_every_layer_without_a_wrapping_ring(wide_onnx):
    model, log = _fused(wide_onnx), FusionLog()
    assert fuse_ort_gqa(model, _layout(wide_onnx), log) == [0, 1, 2, 3], log.refusals
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 4 and all(n.domain == "com.microsoft" for n in gqa)
    assert not [n for n in model.graph if n.op_type in ("Attention", "Softmax")]
    assert all(n.attributes.get_int("num_heads") == 4 and n.attributes.get_int("kv_num_heads") == 2
               and n.attributes.get_int("do_rotary") == 0 for n in gqa)
    assert [n.inputs[3].name for n in gqa] == [contract.past_key(i) for i in range(4)]
    assert [n.outputs[1].name for n in gqa] == [contract.present_key(i) for i in range(4)]
    # The ring index (Gather) and the masks are gone with the Attention nodes.
    assert not [n for n in model.graph if n.op_type == "Gather" and n.outputs[0].is_graph_output()]
    assert not [n for n in model.graph if n.op_type == "Where"]


def test_gqa_refuses_chunked_layers_whose_ring_wraps(demo_clean, demo_onnx):
    # The demo: chunks of 8 over 512 positions. The NoPE layer (3) is causal over its full cache.
    model, log = _fused(demo_clean), FusionLog()
    assert fuse_ort_gqa(model, _layout(demo_onnx), log) == [3]
    assert len(log.refusals) == 3 and all("chunks of 8 < max_positions 512" in r.reason for r in log.refusals), log.refusals


def test_gqa_refuses_a_ring_that_wraps(demo_clean):
    # A layout that does not call the layers chunked still meets rings of 8 slots for 512 positions.
    model, log = _fused(demo_clean), FusionLog()
    assert fuse_ort_gqa(model, GqaLayout(512, None, frozenset()), log) == [3]
    assert len(log.refusals) == 3 and all("ring of 8 slots wraps" in r.reason for r in log.refusals), log.refusals


def test_gqa_refuses_chunked_attention_over_a_full_cache(demo_ckpt, tmp_path):
    # chunked_cache="full": the chunked layers grow a full cache, but their mask is still chunked.
    from moec.compiler.export import ExportConfig, export_onnx

    export_onnx(demo_ckpt, tmp_path / "model.onnx", ExportConfig(chunked_cache="full"))
    model, log = _fused(tmp_path / "model.onnx"), FusionLog()
    assert fuse_ort_gqa(model, _layout(tmp_path / "model.onnx"), log) == [3]
    assert all("chunks of 8" in r.reason and "sliding window" in r.reason for r in log.refusals) and len(log.refusals) == 3


def test_gqa_refuses_without_a_sidecar(wide_onnx):
    model, log = _fused(wide_onnx), FusionLog()
    assert fuse_ort_gqa(model, None, log) == []
    assert len(log.refusals) == 4 and all("no moec sidecar" in r.reason for r in log.refusals)


def test_gqa_refuses_a_second_consumer(wide_onnx):
    model, log = _fused(wide_onnx), FusionLog()
    attn = next(n for n in model.graph if n.op_type == "Attention")
    model.graph.outputs.append(attn.inputs[0])  # layer 0's transposed queries, seen outside
    assert fuse_ort_gqa(model, _layout(wide_onnx), log) == [1, 2, 3]
    assert any("other consumers" in r.reason for r in log.refusals), log.refusals


def test_gqa_refuses_fp16(wide_onnx, tmp_path):
    # --precision fp16: the fused Attention is fp16 with an fp32 softmax (softmax_precision).
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    report = optimize_onnx(wide_onnx, tmp_path / "model.onnx", OptimizeConfig(target="ort", precision="fp16"))
    gqa = [r for r in report.refusals if r.startswith("fuse_ort_gqa")]
    assert len(gqa) == 4 and all("fp32 only" in r for r in gqa), report.refusals
    assert contract.GQA_LAYERS not in json.loads(contract.sidecar_path(tmp_path / "model.onnx").read_text())


@pytest.mark.parametrize("past,new,batch", [(0, 7, 2), (7, 1, 2), (5, 3, 1), (30, 2, 1)])
def test_gqa_keeps_numbers(wide_onnx, past, new, batch):
    before = _fused(wide_onnx)
    after = _fused(wide_onnx)
    assert fuse_ort_gqa(after, _layout(wide_onnx)) == [0, 1, 2, 3]
    feeds = _feeds(before, past, new, batch)
    ref, got = ort_run(before, feeds), ort_run(after, feeds)
    assert rel_err(got[0], ref[0]) <= 1e-5  # logits
    for r, g in zip(ref[1:], got[1:]):  # the cache slots written so far (past GQA's copy, slots are unset)
        assert rel_err(g[:, :, :past + new], r[:, :, :past + new]) <= 1e-5


def test_gqa_keeps_numbers_on_the_nope_layer_past_temperature_tuning(demo_clean, demo_onnx):
    # The demo's NoPE layer scales q from position 7 on (floor_scale 8); decode at 20 crosses chunks.
    before, after = _fused(demo_clean), _fused(demo_clean)
    assert fuse_ort_gqa(after, _layout(demo_onnx)) == [3]
    from conftest import demo_feeds

    for past, new in ((0, 13), (20, 1)):
        feeds = demo_feeds(before, past, new)
        ref, got = ort_run(before, feeds), ort_run(after, feeds)
        assert max(rel_err(g, r) for g, r in zip(got, ref)) <= 1e-5
