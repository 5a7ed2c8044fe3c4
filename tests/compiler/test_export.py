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

import lowprec

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
    # Layer 0 uses chunked attention: a ring of one chunk (static); layer 3 (NoPE) grows.
    assert dims(ins["past_key.0"]) == ["batch", K, cfg.attention_chunk_size, D]
    assert dims(outs["present_key.0"]) == ["batch", K, cfg.attention_chunk_size, D]
    assert dims(ins[f"past_key.{L - 1}"]) == ["batch", K, "past_len", D]
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


def _low_precision_case(demo_ckpt, dtype, batch, steps):
    """Prompt, fed tokens and the torch references (fp32 and ``dtype``) for a low-precision check."""
    ids, pos = _prompt(batch=batch)
    tokens = lowprec.decode_tokens(demo_ckpt, ids, pos, steps)
    fp32 = lowprec.torch_logits(demo_ckpt, torch.float32, ids, pos, tokens)
    low = lowprec.torch_logits(demo_ckpt, dtype, ids, pos, tokens)
    return ids, pos, tokens, fp32, low


def test_fp16_runs_in_ort_as_close_to_fp32_as_torch_fp16(onnx_fp16, demo_ckpt):
    """fp16 on ONNX Runtime is no further from fp32 torch than torch fp16 is (tests/lowprec.py)."""
    assert _float_initializer_types(onnx_fp16) == {"FLOAT16"}
    ids, pos, tokens, fp32, low = _low_precision_case(demo_ckpt, torch.float16, batch=2, steps=4)
    assert OrtBackend.from_onnx(onnx_fp16)._kv_type == "tensor(float16)"
    got = lowprec.ort_logits(onnx_fp16, ids, pos, tokens)
    lowprec.assert_as_close_as_torch(got, low, fp32, "fp16 graph on ONNX Runtime")


def _round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """``x`` rounded to ``bits`` explicit mantissa bits: a coarser format than the one intended."""
    m, e = np.frexp(x.astype(np.float32))
    return np.ldexp(np.round(m * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), e)


def test_fp16_check_fails_on_a_wrong_rounding(onnx_fp16, demo_ckpt, tmp_path):
    """The fp16 check above, on a graph whose weights were rounded to 4 mantissa bits instead of
    fp16's 10 (a wrong rounding at export): it must fail."""
    m = onnx.load(str(onnx_fp16))
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT16 and t.name.startswith("model.layers."):
            a = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(_round_mantissa(a, 4).astype(np.float16), t.name))
    bad = tmp_path / "model.onnx"
    onnx.save(m, str(bad))
    shutil.copy(contract.sidecar_path(onnx_fp16), contract.sidecar_path(bad))
    ids, pos, tokens, fp32, low = _low_precision_case(demo_ckpt, torch.float16, batch=2, steps=4)
    got = lowprec.ort_logits(bad, ids, pos, tokens)
    ratio, _, _ = lowprec.ratio_to_torch(got, low, fp32)
    assert ratio > lowprec.FACTOR, ratio


def _bf16_promoting_binary_ops():
    """Add/Sub/Mul/Div/Pow for onnx's reference evaluator that compute a bf16-with-fp32 pair in
    bf16 (the evaluator refuses mixed types). Only the planted dropped-upcast graph needs them: its
    former fp32 values meet fp32 constants (norm epsilons, scales)."""
    import ml_dtypes
    from onnx.reference.ops import op_add, op_div, op_mul, op_pow, op_sub

    def promoting(base):
        def run(self, x, y):
            if {x.dtype, y.dtype} == {np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)}:
                x, y = x.astype(ml_dtypes.bfloat16), y.astype(ml_dtypes.bfloat16)
            return base.run(self, x, y)

        return type(base.__name__, (base,), {"run": run, "op_domain": ""})

    return [promoting(op) for op in (op_add.Add, op_sub.Sub, op_mul.Mul, op_div.Div, op_pow.Pow)]


def _bf16_reference_steps(model_proto, ids, pos, tokens, new_ops=None):
    """The bf16 graph on onnx's reference evaluator, in bf16 (ml_dtypes), without any upcast."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(model_proto, new_ops=new_ops)
    # Layers 0-2 use chunked attention: rings of 8 (the chunk) zero slots; layer 3 a full cache.
    feeds = {
        f"past_{kv}.{i}": np.zeros((ids.shape[0], 2, 0 if i == 3 else 8, 16), dtype=ml_dtypes.bfloat16)
        for i in range(4) for kv in ("key", "value")
    }
    out = []
    for step in range(len(tokens) + 1):
        outs = ev.run(None, {"input_ids": ids, "position_ids": pos, **feeds})
        assert outs[0].dtype == np.float32 and outs[1].dtype == ml_dtypes.bfloat16
        out.append(outs[0])
        feeds = {f"past_{kv}.{i}": outs[1 + 2 * i + (kv == "value")] for i in range(4) for kv in ("key", "value")}
        if step < len(tokens):
            ids, pos = tokens[step], np.full((ids.shape[0], 1), outs[7].shape[2])  # present_key.3: full cache
    return out


@pytest.fixture(scope="module")
def bf16_case(demo_ckpt):
    return _low_precision_case(demo_ckpt, torch.bfloat16, batch=1, steps=3)


def test_bf16_graph_as_close_to_fp32_as_torch_bf16(onnx_bf16, bf16_case):
    """ONNX Runtime's CPU provider cannot run bf16 arithmetic (see the next test), so the bf16
    graph's numbers are checked with onnx's reference evaluator, against fp32 torch, as a
    multiple of torch bf16's own error (tests/lowprec.py)."""
    assert _float_initializer_types(onnx_bf16) == {"BFLOAT16"}
    ids, pos, tokens, fp32, low = bf16_case
    got = _bf16_reference_steps(onnx.load(str(onnx_bf16)), ids, pos, tokens)
    lowprec.assert_as_close_as_torch(got, low, fp32, "bf16 graph on onnx's reference evaluator")


def _drop_fp32_upcasts(m: onnx.ModelProto) -> int:
    """Make every Cast of a bf16 value to fp32 that does not produce a graph output cast to bf16
    instead, so norms, softmax and routing run in bf16. Returns how many were changed."""
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *m.graph.input)}
    outputs = {o.name for o in m.graph.output}
    dropped = 0
    for n in m.graph.node:
        if n.op_type == "Cast" and n.output[0] not in outputs and types.get(n.input[0]) == onnx.TensorProto.BFLOAT16:
            to = next(a for a in n.attribute if a.name == "to")
            if to.i == onnx.TensorProto.FLOAT:
                to.i, dropped = onnx.TensorProto.BFLOAT16, dropped + 1
    return dropped


def _round_bf16_weights(m: onnx.ModelProto) -> int:
    """Round the layers' bf16 weights to 4 mantissa bits instead of bf16's 7. Returns how many."""
    import ml_dtypes

    n = 0
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.BFLOAT16 and t.name.startswith("model.layers."):
            a = onnx.numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(onnx.numpy_helper.from_array(_round_mantissa(a, 4).astype(ml_dtypes.bfloat16), t.name))
            n += 1
    return n


@pytest.mark.parametrize("fault", ["dropped_upcast", "wrong_rounding"])
def test_bf16_check_fails_on_a_planted_fault(onnx_bf16, bf16_case, fault):
    """The bf16 check above, on the same graph with a planted fault: its fp32 upcasts dropped, or
    its weights rounded to a coarser format. Each must fail the check."""
    m = onnx.load(str(onnx_bf16))
    changed = (_drop_fp32_upcasts if fault == "dropped_upcast" else _round_bf16_weights)(m)
    assert changed > 10
    ids, pos, tokens, fp32, low = bf16_case
    got = _bf16_reference_steps(m, ids, pos, tokens, new_ops=_bf16_promoting_binary_ops())
    ratio, _, _ = lowprec.ratio_to_torch(got, low, fp32)
    assert ratio > lowprec.FACTOR, ratio


def test_bf16_in_ort_cpu(onnx_bf16, bf16_case):
    """ORT 1.32's CPU provider lacks bf16 kernels for Where, Mul, MatMul, Expand, Add, Sigmoid,
    Gemm and Tile (checked op by op). The backend must say so, not upcast; where a provider has
    them (CUDA, or a later ORT), the export must be as close to fp32 as torch bf16."""
    try:
        OrtBackend.from_onnx(onnx_bf16, providers=["CPUExecutionProvider"])
    except MoecError as e:
        msg = str(e)
        assert "has no kernel" in msg and "bf16" in msg and "Could not find an implementation for" in msg
        pytest.xfail(f"onnxruntime CPU has no bf16 kernels: {msg}")
    ids, pos, tokens, fp32, low = bf16_case
    got = lowprec.ort_logits(onnx_bf16, ids, pos, tokens)
    lowprec.assert_as_close_as_torch(got, low, fp32, "bf16 graph on ONNX Runtime")


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
    assert not out.parent.exists()  # the folder the export made for it is gone too


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
    assert not out.parent.exists()  # the folder the export made for it is gone too


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
