"""ONNX Runtime backend against the PyTorch reference on the demo model (fp32 export)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from moec.common import contract
from moec.common.errors import MoecError
from moec.runtime.backend import Backend
from moec.runtime.generate import GenerationConfig, generate
from moec.runtime.ort_backend import OrtBackend, OrtCache


@pytest.fixture(scope="module")
def ort_backend(demo_onnx):
    return OrtBackend.from_onnx(demo_onnx)


@pytest.fixture(scope="module")
def torch_backend(demo_ckpt):
    from moec.models.torch_backend import TorchBackend

    return TorchBackend.from_checkpoint(demo_ckpt, dtype="fp32")


@pytest.fixture(scope="module")
def chunk(demo_ckpt):
    from moec.models import Llama4Config

    c = Llama4Config.from_pretrained(demo_ckpt).attention_chunk_size
    assert c is not None and c >= 2
    return c


def test_is_a_backend(ort_backend):
    assert isinstance(ort_backend, Backend)
    d = ort_backend.describe()
    import onnxruntime

    assert d["onnxruntime"] == onnxruntime.__version__ and d["provider"] == "CPUExecutionProvider"
    assert ort_backend.eos_token_ids and ort_backend.max_positions > 0


def test_logits_match_torch_prefill_and_decode(ort_backend, torch_backend, chunk):
    """fp32: logits within 1e-4 of torch for a prompt over two chunks and decode steps that
    cross the next chunk boundary, batch 2."""
    rng = np.random.default_rng(1)
    S = 2 * chunk + 3
    ids = rng.integers(0, 256, size=(2, S))
    pos = np.broadcast_to(np.arange(S), ids.shape).copy()
    o_cache, t_cache = ort_backend.init_cache(2), torch_backend.init_cache(2)
    worst = 0.0
    for step in range(chunk + 2):
        o_logits, o_cache = ort_backend.forward(ids, pos, o_cache)
        t_logits, t_cache = torch_backend.forward(ids, pos, t_cache)
        assert o_logits.dtype == np.float32 and o_logits.shape == t_logits.shape
        worst = max(worst, float(np.abs(o_logits - t_logits).max()))
        assert o_cache.past_len == t_cache.past_len
        ids = t_logits[:, -1].argmax(-1)[:, None]
        pos = np.full((2, 1), o_cache.past_len)
    assert o_cache.past_len > 3 * chunk  # decode crossed into the fourth chunk
    assert worst <= 1e-4, worst


def test_kv_cache_stays_in_ort_values(ort_backend):
    import onnxruntime as ort

    cache = ort_backend.init_cache(1)
    assert isinstance(cache, OrtCache) and cache.past_len == 0
    _, cache = ort_backend.forward(np.array([[1, 2, 3]]), np.array([[0, 1, 2]]), cache)
    assert cache.past_len == 3
    assert all(isinstance(k, ort.OrtValue) for k in cache.keys + cache.values)
    # Layer 0 (chunked attention) keeps a ring of one chunk, layer 3 (NoPE) every position.
    assert cache.keys[0].shape()[2] == 8 and cache.keys[3].shape()[2] == 3


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_greedy_tokens_equal_torch(ort_backend, torch_backend, chunk, chunks):
    """Generation lengths of 1, 2 and 3 attention chunks after a prompt longer than a chunk."""
    prompt = list(np.random.default_rng(chunks).integers(0, 256, size=chunk + 3))
    cfg = GenerationConfig(max_new_tokens=chunks * chunk, stop_on_eos=False)
    got = generate(ort_backend, prompt, cfg)
    want = generate(torch_backend, prompt, cfg)
    assert len(got.new_tokens[0]) == chunks * chunk
    assert got.new_tokens == want.new_tokens


def test_sampled_tokens_equal_torch(ort_backend, torch_backend):
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9, seed=5, stop_on_eos=False)
    prompt = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]
    assert generate(ort_backend, prompt, cfg).new_tokens == generate(torch_backend, prompt, cfg).new_tokens


def test_prompt_longer_than_max_positions(ort_backend):
    too_long = [1] * (ort_backend.max_positions + 1)
    with pytest.raises(MoecError, match=f"at most {ort_backend.max_positions} positions"):
        generate(ort_backend, too_long, GenerationConfig(max_new_tokens=1))


@pytest.mark.parametrize(
    "ids_BS, pos_BS, got",
    [
        ([[99999, 99999]], [[0, 1]], "got 99999 (at positions 0, 1)"),
        ([[5, 264, 7, 300]], [[4, 5, 6, 7]], "got 264 (at position 5), 300 (at position 7)"),
        ([[1, 300], [300, 2]], [[8, 9], [8, 9]], "got 300 (at sequence 0 position 9, sequence 1 position 8)"),
        ([[300] * 7], [list(range(7))], "got 300 (at positions 0, 1, 2, 3, 4 and 2 more)"),
    ],
)
def test_token_out_of_vocabulary_named_alike(ort_backend, torch_backend, ids_BS, pos_BS, got):
    """Both backends name the offending ids and where they are, in the same words."""
    ids_BS, pos_BS = np.array(ids_BS), np.array(pos_BS)
    want = f"token ids must lie in [0, {ort_backend.vocab_size}), {got}"
    messages = []
    for backend in (ort_backend, torch_backend):
        with pytest.raises(MoecError) as e:
            backend.forward(ids_BS, pos_BS, backend.init_cache(ids_BS.shape[0]))
        messages.append(str(e.value))
    assert messages[0] == f"{want}, for {ort_backend.path}"
    assert messages[1] == want


def _plain_onnx(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_not_a_moec_export_without_sidecar(tmp_path):
    _plain_onnx(tmp_path / "plain.onnx")
    with pytest.raises(MoecError, match=r"not a moec export: its metadata file .*plain\.moec\.json is missing"):
        OrtBackend.from_onnx(tmp_path / "plain.onnx")


def test_not_a_moec_export_names_missing_inputs(tmp_path, demo_onnx):
    _plain_onnx(tmp_path / "plain.onnx")
    shutil.copyfile(contract.sidecar_path(demo_onnx), contract.sidecar_path(tmp_path / "plain.onnx"))
    with pytest.raises(MoecError) as e:
        OrtBackend.from_onnx(tmp_path / "plain.onnx")
    msg = str(e.value)
    assert "missing inputs ['input_ids', 'position_ids', 'past_key.0'" in msg
    assert "unexpected inputs ['x']" in msg and "plain.onnx" in msg


def test_sidecar_lacking_keys(tmp_path, demo_onnx):
    shutil.copyfile(demo_onnx, tmp_path / "m.onnx")
    (tmp_path / "m.moec.json").write_text(json.dumps({"dtype": "fp32"}))
    with pytest.raises(MoecError, match="lacks num_layers, max_positions, vocab_size, max_batch, model_config, generation"):
        OrtBackend.from_onnx(tmp_path / "m.onnx")


def test_garbage_onnx_file(tmp_path, demo_onnx):
    (tmp_path / "m.onnx").write_bytes(b"this is not a protobuf")
    shutil.copyfile(contract.sidecar_path(demo_onnx), tmp_path / "m.moec.json")
    with pytest.raises(MoecError, match="m.onnx is not a readable ONNX model"):
        OrtBackend.from_onnx(tmp_path / "m.onnx")


def test_missing_file():
    with pytest.raises(MoecError, match="does not exist"):
        OrtBackend.from_onnx("/nonexistent/model.onnx")
