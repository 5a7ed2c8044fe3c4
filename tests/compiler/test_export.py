"""The export stage: graph contract, dtypes, external data, and failures leaving nothing behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler import export as export_mod
from moec.compiler.export import ExportConfig, export_onnx, router_precisions
from moec.runtime.ort_backend import OrtBackend

# fp16 vs torch fp16 on the demo model (logits of magnitude ~4): measured max abs error 6.4e-3 on
# logits and 7.5e-3 on KV over prefill + 8 decode steps (`moec verify --dtype fp16`). The bound
# is ~8x that; a wrong op or a wrong dtype on the router shows up as O(0.1..1).
FP16_ATOL = 5e-2
# bf16 via onnx.reference vs torch bf16: measured 4e-2 (about one bf16 ulp at |logit| ~4). The
# bound allows 4 ulps at that magnitude.
BF16_ATOL = 1.25e-1


@pytest.fixture(scope="module")
def onnx_fp16(demo_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "model.onnx"
    export_onnx(demo_ckpt, out, ExportConfig(dtype="fp16"))
    return out


@pytest.fixture(scope="module")
def onnx_bf16(demo_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "model.onnx"
    export_onnx(demo_ckpt, out, ExportConfig(dtype="bf16"))
    return out


@pytest.fixture(scope="module")
def onnx_external(demo_ckpt, tmp_path_factory):
    """Threshold forced to 0: every weight goes to external data. Also a smaller max_seq/batch."""
    out = tmp_path_factory.mktemp("ext") / "ext.onnx"
    result = export_onnx(demo_ckpt, out, ExportConfig(external_data_threshold_bytes=0, max_seq=64, max_batch=3))
    return out, result


def _prompt(chunk: int = 8, batch: int = 2, seed: int = 0):
    S = 2 * chunk + 3
    ids = np.random.default_rng(seed).integers(0, 256, size=(batch, S))
    return ids, np.broadcast_to(np.arange(S), ids.shape).copy()


def _torch_steps(demo_ckpt, dtype, ids, pos, steps):
    """Reference logits of a prefill and ``steps`` greedy decode steps (float32 numpy)."""
    from moec.models import load_pretrained

    model = load_pretrained(demo_ckpt, dtype=dtype)
    out, past, tokens = [], None, []
    with torch.no_grad():
        x, p = torch.from_numpy(ids), torch.from_numpy(pos)
        for _ in range(steps + 1):
            logits, past = model(x, p, past)
            out.append(logits.float().numpy())
            x = logits[:, -1:].float().argmax(-1)
            tokens.append(x.numpy())
            p = torch.full_like(x, past[0][0].shape[2])
    return out, tokens


# --- the fp32 export (shared session fixture) ------------------------------------------------


def test_files_and_sidecar(demo_onnx, demo_ckpt):
    from moec.models import Llama4Config

    cfg = Llama4Config.from_pretrained(demo_ckpt)
    side = json.loads(contract.sidecar_path(demo_onnx).read_text())
    assert side["format"] == "moec-onnx" and side["dtype"] == "fp32"
    assert Llama4Config.from_hf_dict(side["model_config"]) == cfg
    assert side["num_layers"] == cfg.num_hidden_layers and side["moe_layers"] == list(cfg.moe_layer_indices())
    assert side["max_positions"] == cfg.max_position_embeddings
    assert side["generation"]["eos_token_ids"] == list(cfg.eos_token_ids)
    assert side["external_data"] is None and side["tokenizer"] == "tokenizer.json"
    assert (demo_onnx.parent / "tokenizer.json").read_bytes() == (demo_ckpt / "tokenizer.json").read_bytes()
    assert not (demo_onnx.parent / (demo_onnx.name + ".data")).exists()
    # Nothing else (no temporary files) beside the export.
    assert sorted(p.name for p in demo_onnx.parent.iterdir()) == ["model.moec.json", "model.onnx", "tokenizer.json"]


def test_graph_contract(demo_onnx, demo_ckpt):
    from moec.models import Llama4Config

    cfg = Llama4Config.from_pretrained(demo_ckpt)
    m = onnx.load(str(demo_onnx))
    onnx.checker.check_model(m, full_check=True)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    ins = {i.name: i for i in m.graph.input}
    outs = {o.name: o for o in m.graph.output}
    L, K, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    assert list(ins) == ["input_ids", "position_ids"] + [f"past_{kv}.{i}" for i in range(L) for kv in ("key", "value")]
    assert dims(ins["input_ids"]) == ["batch", "new_tokens"] == dims(ins["position_ids"])
    assert dims(ins["past_key.0"]) == ["batch", K, "past_len", D]
    assert dims(outs["logits"]) == ["batch", "new_tokens", cfg.vocab_size]
    assert outs["logits"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(outs[f"present_value.{L - 1}"])[2] in ("past_len + new_tokens", "new_tokens + past_len")
    # Weights keep their checkpoint names; nn.Linear weights are stored pre-transposed (".T"),
    # with no Transpose of an initializer left in the graph.
    inits = {t.name for t in m.graph.initializer}
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in inits
    assert "model.layers.0.self_attn.q_proj.weight.T" in inits
    assert not [n for n in m.graph.node if n.op_type == "Transpose" and n.input[0] in inits]


def test_moe_blocks_stay_unfused(demo_onnx, demo_ckpt):
    from moec.models import Llama4Config

    n_moe = len(Llama4Config.from_pretrained(demo_ckpt).moe_layer_indices())
    m = onnx.load(str(demo_onnx), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("TopK") == n_moe and ops.count("ScatterElements") == n_moe and ops.count("Tile") == n_moe
    assert ops.count("ReduceSum") == n_moe
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)  # no fused / custom-domain ops


def test_fold_is_lazy(demo_ckpt):
    """The weight transposes become LazyTensors: nothing is materialised before saving."""
    import onnx_ir as ir

    from moec.models import Llama4Config, load_pretrained

    cfg = Llama4Config.from_pretrained(demo_ckpt)
    model = load_pretrained(demo_ckpt)
    g = export_mod._trace_to_onnx(model, cfg, ExportConfig(), cfg.max_position_embeddings)
    n = export_mod._fold_weight_layout_ops(g)
    lazy = [v for v in g.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
    assert n == len(lazy) > 0
    assert {v.name for v in lazy} >= {"lm_head.weight.T", "model.layers.0.self_attn.q_proj.weight.T"}
    w = dict(model.named_parameters())["lm_head.weight"].numpy()
    np.testing.assert_array_equal(g.graph.initializers["lm_head.weight.T"].const_value.numpy(), w.T)


# --- fp16 / bf16 ----------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["demo_onnx", "onnx_fp16", "onnx_bf16"])
def test_router_math_is_fp32(fixture, request):
    path = request.getfixturevalue(fixture)
    found = router_precisions(path)
    assert len(found) == 4  # TopK + Sigmoid in each of the 2 MoE layers
    assert {t for _, t in found} == {"FLOAT"}


def _float_initializer_types(path):
    m = onnx.load(str(path), load_external_data=False)
    # Checkpoint weights only; the RoPE frequencies are an fp32 buffer on purpose.
    weights = [t for t in m.graph.initializer if t.name.startswith(("model.", "lm_head")) and "rotary_emb" not in t.name]
    assert len(weights) > 20
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in weights}


def test_fp16_runs_in_ort_and_matches_torch_fp16(onnx_fp16, demo_ckpt):
    assert _float_initializer_types(onnx_fp16) == {"FLOAT16"}
    be = OrtBackend.from_onnx(onnx_fp16)
    assert be._kv_type == "tensor(float16)"
    ids, pos = _prompt()
    want, tokens = _torch_steps(demo_ckpt, torch.float16, ids, pos, steps=8)
    cache = be.init_cache(2)
    worst = 0.0
    for step, ref in enumerate(want):
        got, cache = be.forward(ids, pos, cache)
        worst = max(worst, float(np.abs(got - ref).max()))
        ids, pos = tokens[step], np.full((2, 1), cache.past_len)
    assert worst <= FP16_ATOL, worst


def test_bf16_graph_matches_torch_bf16(onnx_bf16, demo_ckpt):
    """ONNX Runtime's CPU provider cannot run bf16 arithmetic (see the next test), so the bf16
    graph's numbers are checked with onnx's reference evaluator, in bf16 (ml_dtypes), without
    any upcast of the graph."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    assert _float_initializer_types(onnx_bf16) == {"BFLOAT16"}
    ev = ReferenceEvaluator(onnx.load(str(onnx_bf16)))
    ids, pos = _prompt(batch=1)
    want, tokens = _torch_steps(demo_ckpt, torch.bfloat16, ids, pos, steps=3)
    feeds = {
        f"past_{kv}.{i}": np.zeros((1, 2, 0, 16), dtype=ml_dtypes.bfloat16) for i in range(4) for kv in ("key", "value")
    }
    worst = 0.0
    for step, ref in enumerate(want):
        outs = ev.run(None, {"input_ids": ids, "position_ids": pos, **feeds})
        assert outs[0].dtype == np.float32 and outs[1].dtype == ml_dtypes.bfloat16
        worst = max(worst, float(np.abs(outs[0] - ref).max()))
        feeds = {f"past_{kv}.{i}": outs[1 + 2 * i + (kv == "value")] for i in range(4) for kv in ("key", "value")}
        ids, pos = tokens[step], np.full((1, 1), outs[1].shape[2])
    assert worst <= BF16_ATOL, worst


def test_bf16_in_ort_cpu(onnx_bf16, demo_ckpt):
    """ORT 1.32's CPU provider lacks bf16 kernels for Where, Mul, MatMul, Expand, Add, Sigmoid,
    Gemm and Tile (checked op by op). The backend must say so, not upcast; where a provider has
    them (CUDA, or a later ORT), the export must match torch bf16."""
    try:
        be = OrtBackend.from_onnx(onnx_bf16, providers=["CPUExecutionProvider"])
    except MoecError as e:
        msg = str(e)
        assert "has no kernel" in msg and "bf16" in msg and "Could not find an implementation for" in msg
        pytest.xfail(f"onnxruntime CPU has no bf16 kernels: {msg}")
    ids, pos = _prompt()
    want, _ = _torch_steps(demo_ckpt, torch.bfloat16, ids, pos, steps=0)
    got, _ = be.forward(ids, pos, be.init_cache(2))
    assert float(np.abs(got - want[0]).max()) <= BF16_ATOL


# --- external data -------------------------------------------------------------------------


def test_external_data_written_in_one_file(onnx_external):
    out, result = onnx_external
    data = out.with_name("ext.onnx.data")
    assert result.external_data_path == data and data.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ext.moec.json", "ext.onnx", "ext.onnx.data", "tokenizer.json"]
    m = onnx.load(str(out), load_external_data=False)
    external = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert locations == {"ext.onnx.data"}
    assert sum(t.dims and np.prod(t.dims) * 4 for t in external) >= 0.99 * result.weight_bytes
    assert data.stat().st_size >= 0.99 * result.weight_bytes
    onnx.checker.check_model(str(out), full_check=True)
    side = json.loads(contract.sidecar_path(out).read_text())
    assert side["external_data"] == "ext.onnx.data" and side["max_positions"] == 64 and side["max_batch"] == 3


def test_external_data_export_runs_like_inline(onnx_external, demo_onnx):
    out, _ = onnx_external
    a, b = OrtBackend.from_onnx(out), OrtBackend.from_onnx(demo_onnx)
    ids, pos = _prompt()
    la, _ = a.forward(ids, pos, a.init_cache(2))
    lb, _ = b.forward(ids, pos, b.init_cache(2))
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-6)
    assert a.max_positions == 64


def test_missing_external_data_file(onnx_external, tmp_path):
    out, _ = onnx_external
    for f in ("ext.onnx", "ext.moec.json"):
        shutil.copyfile(out.with_name(f), tmp_path / f)
    with pytest.raises(MoecError, match=r"ext\.onnx\.data \(missing\)"):
        OrtBackend.from_onnx(tmp_path / "ext.onnx")
    # A truncated data file is named too.
    (tmp_path / "ext.onnx.data").write_bytes(out.with_name("ext.onnx.data").read_bytes()[:1000])
    with pytest.raises(MoecError, match=r"ext\.onnx\.data \(has 1000 bytes, the graph needs"):
        OrtBackend.from_onnx(tmp_path / "ext.onnx")


# --- failures leave nothing ----------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(dtype="fp8"), dict(dtype="float64"), dict(max_batch=0), dict(max_seq=1)])
def test_bad_config(kwargs):
    with pytest.raises(MoecError):
        ExportConfig(**kwargs)


def test_failure_during_check_leaves_nothing(demo_ckpt, tmp_path, monkeypatch):
    def broken_check(path):
        assert path.is_file() and path.with_name(path.name + ".data").is_file()  # written, not yet moved
        raise RuntimeError("checker failed")

    monkeypatch.setattr(export_mod, "_check_by_path", broken_check)
    out = tmp_path / "sub" / "model.onnx"
    with pytest.raises(RuntimeError, match="checker failed"):
        export_onnx(demo_ckpt, out, ExportConfig(external_data_threshold_bytes=0))
    assert list(out.parent.iterdir()) == []


def test_bad_destinations(demo_ckpt, tmp_path):
    with pytest.raises(MoecError, match="must end in .onnx"):
        export_onnx(demo_ckpt, tmp_path / "model.bin")
    with pytest.raises(MoecError, match="exceeds the model's max_position_embeddings"):
        export_onnx(demo_ckpt, tmp_path / "m.onnx", ExportConfig(max_seq=10**6))
    with pytest.raises(MoecError, match="no_such_ckpt does not exist"):
        export_onnx(tmp_path / "no_such_ckpt", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_fails_before_the_export(demo_ckpt, tmp_path, monkeypatch):
    """A file where a folder should be, or a location the OS refuses: a MoecError at once."""
    (tmp_path / "notes.txt").write_text("keep")
    import moec.models

    def never(*args, **kwargs):
        raise AssertionError("the destination is checked before the checkpoint is loaded")

    monkeypatch.setattr(moec.models, "load_pretrained", never)
    with pytest.raises(MoecError, match=r"cannot write .*notes\.txt/m\.onnx: .*; choose a writable location"):
        export_onnx(demo_ckpt, tmp_path / "notes.txt" / "m.onnx")
    with pytest.raises(MoecError, match=r"cannot write /proc/m\.onnx"):
        export_onnx(demo_ckpt, "/proc/m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_full_disk_while_saving(demo_ckpt, tmp_path, monkeypatch):
    import errno

    import onnx_ir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", full)
    out = tmp_path / "o" / "m.onnx"
    with pytest.raises(MoecError, match=r"cannot write .*m\.onnx: No space left on device; free some space"):
        export_onnx(demo_ckpt, out)
    assert list(out.parent.iterdir()) == []


def test_variant_config_matches_torch(tmp_path):
    """Other Llama 4 features through export + ORT: tied embeddings (the tied weight is both
    gathered and pre-transposed), top-2 routing, every layer MoE, no QK norm, plain RoPE,
    chunk of 5."""
    from moec.models import Llama4Config
    from moec.models.demo import write_demo_checkpoint
    from moec.models.torch_backend import TorchBackend
    from moec.runtime.generate import GenerationConfig, generate

    cfg = Llama4Config.preset("llama4-tiny").replace(
        tie_word_embeddings=True,
        num_experts_per_tok=2,
        moe_layers=[0, 1, 2, 3],
        use_qk_norm=False,
        attention_chunk_size=5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    ckpt = write_demo_checkpoint(tmp_path / "ckpt", preset=cfg, seed=3)
    export_onnx(ckpt, tmp_path / "out" / "m.onnx", ExportConfig(max_seq=64))
    assert router_precisions(tmp_path / "out" / "m.onnx") and len(router_precisions(tmp_path / "out" / "m.onnx")) == 8
    ort_be, torch_be = OrtBackend.from_onnx(tmp_path / "out" / "m.onnx"), TorchBackend.from_checkpoint(ckpt)
    ids, pos = _prompt(chunk=5)
    a, _ = ort_be.forward(ids, pos, ort_be.init_cache(2))
    b, _ = torch_be.forward(ids, pos, torch_be.init_cache(2))
    assert float(np.abs(a - b).max()) <= 1e-4
    g = GenerationConfig(max_new_tokens=12, stop_on_eos=False)
    assert generate(ort_be, ids, g).new_tokens == generate(torch_be, ids, g).new_tokens
