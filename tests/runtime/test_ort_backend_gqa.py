"""ONNX Runtime backend on graphs with com.microsoft.GroupQueryAttention (passes/lowerings/ort_gqa.py):
greedy tokens and logits equal the graph without it and the torch model (prefill + 16 decode steps),
rings updated in place, and the steps the op cannot run refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.runtime.generate import GenerationConfig, generate
from moec.runtime.ort_backend import OrtBackend

WIDE = 32  # chunk = max positions: no ring wraps, so every layer takes GroupQueryAttention
PROMPT, DECODE = 7, 16


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.models import Llama4Config
    from moec.models.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("wide_gqa")
    config = Llama4Config.preset("llama4-tiny").replace(attention_chunk_size=WIDE, max_position_embeddings=WIDE)
    write_demo_checkpoint(root / "ckpt", preset=config, seed=0)
    export_onnx(root / "ckpt", root / "export" / "model.onnx", ExportConfig(dtype="fp32"))
    return root


def _optimized(export, out_dir, **options):
    report = optimize_onnx(export, out_dir / "model.onnx", OptimizeConfig(target="ort", **options))
    return out_dir / "model.onnx", report


@pytest.fixture(scope="module")
def wide_graphs(wide):
    gqa, report = _optimized(wide / "export" / "model.onnx", wide / "gqa")
    plain, _ = _optimized(wide / "export" / "model.onnx", wide / "plain", fuse_gqa=False)
    return gqa, plain, report


def _steps(backend, prompt_BS, decode):
    """Logits of the prefill and each greedy decode step (last position), and the tokens fed."""
    B, S = prompt_BS.shape
    cache = backend.init_cache(B)
    logits, cache = backend.forward(prompt_BS, np.tile(np.arange(S), (B, 1)), cache)
    out, tokens = [logits[:, -1]], []
    for step in range(decode):
        token = out[-1].argmax(-1)[:, None]
        tokens.append(token)
        logits, cache = backend.forward(token, np.full((B, 1), S + step), cache)
        out.append(logits[:, -1])
    return np.stack(out), np.concatenate(tokens, axis=1), cache


def _torch(ckpt):
    from moec.models.torch_backend import TorchBackend

    return TorchBackend.from_checkpoint(ckpt, dtype="fp32")


def test_default_ort_pipeline_rewrites_every_layer(wide_graphs):
    gqa, plain, report = wide_graphs
    assert [r for r in report.passes if r.name == "fuse_ort_gqa"][0].matches == 4
    assert json.loads(contract.sidecar_path(gqa).read_text())[contract.GQA_LAYERS] == [0, 1, 2, 3]
    assert contract.GQA_LAYERS not in json.loads(contract.sidecar_path(plain).read_text())
    assert OrtBackend.from_onnx(gqa).describe()["kv_update"] == "in place (3 ring layers)"


def test_same_tokens_and_logits_as_without_gqa_and_as_torch(wide, wide_graphs):
    gqa, plain, _ = wide_graphs
    prompt = np.random.default_rng(0).integers(0, 256, (2, PROMPT))
    g_logits, g_tokens, g_cache = _steps(OrtBackend.from_onnx(gqa), prompt, DECODE)
    p_logits, p_tokens, _ = _steps(OrtBackend.from_onnx(plain), prompt, DECODE)
    t_logits, t_tokens, _ = _steps(_torch(wide / "ckpt"), prompt, DECODE)
    assert np.array_equal(g_tokens, p_tokens) and np.array_equal(g_tokens, t_tokens)
    assert np.abs(g_logits - p_logits).max() <= 1e-5 * np.abs(p_logits).max()
    assert np.abs(g_logits - t_logits).max() <= 1e-4  # test_ort_backend.py's fp32 tolerance against torch
    assert g_cache.past_len == PROMPT + DECODE and g_cache.keys[0].shape()[2] == WIDE
    # generate() (the loop every backend shares) picks the same tokens.
    r = generate(OrtBackend.from_onnx(gqa), prompt, GenerationConfig(max_new_tokens=DECODE + 1, stop_on_eos=False))
    assert np.array_equal(np.array(r.new_tokens)[:, :DECODE], t_tokens)


def test_the_nope_layer_alone_where_chunked_rings_wrap(demo_ckpt, demo_onnx, tmp_path):
    # The demo (chunks of 8): only the NoPE layer is rewritten; decode crosses chunks, temperature tuning on.
    gqa, report = _optimized(demo_onnx, tmp_path)
    refused = [r for r in report.refusals if r.startswith("fuse_ort_gqa")]
    assert len(refused) == 3 and all("chunks of 8 < max_positions 512" in r for r in refused)
    backend = OrtBackend.from_onnx(gqa)
    assert backend.gqa_layers == (3,) and backend.describe()["kv_update"] == "copy"
    prompt = np.random.default_rng(1).integers(0, 256, (2, 11))
    g_logits, g_tokens, _ = _steps(backend, prompt, DECODE)
    t_logits, t_tokens, _ = _steps(_torch(demo_ckpt), prompt, DECODE)
    assert np.array_equal(g_tokens, t_tokens) and np.abs(g_logits - t_logits).max() <= 1e-4


def test_chunked_prefill_of_one_sequence(wide, wide_graphs):
    gqa, plain, _ = wide_graphs
    ids = np.random.default_rng(2).integers(0, 256, (1, 12))
    out = {}
    for name, path in (("gqa", gqa), ("plain", plain)):
        backend = OrtBackend.from_onnx(path)
        cache, logits = backend.init_cache(1), []
        for start, end in ((0, 5), (5, 11), (11, 12)):
            step, cache = backend.forward(ids[:, start:end], np.arange(start, end)[None], cache)
            logits.append(step)
        out[name] = np.concatenate(logits, axis=1)
    assert np.abs(out["gqa"] - out["plain"]).max() <= 1e-5 * np.abs(out["plain"]).max()


def test_kept_step_binding_on_rings_updated_in_place(wide_graphs):
    """One-token steps through the binding kept across a cache's steps (ort_backend._StepBinding, which
    binds the in-place rings once) equal a binding built afresh each step, and two sequences stepped
    in turn on one backend each get their own rings (tests/runtime/test_ort_step_binding.py: copied rings)."""
    backend = OrtBackend.from_onnx(wide_graphs[0])
    prompts = np.random.default_rng(3).integers(0, 256, (2, 1, PROMPT))
    kept = [_steps(backend, p, DECODE)[0] for p in prompts]
    backend._logits_np = None  # the general path at every step: a fresh binding
    fresh = [_steps(backend, p, DECODE)[0] for p in prompts]
    backend._logits_np = np.float32
    for k, f in zip(kept, fresh):
        np.testing.assert_allclose(k, f, rtol=0, atol=1e-6 * np.abs(f).max())
    caches, out = [], [[], []]
    for i, p in enumerate(prompts):
        logits, cache = backend.forward(p, np.arange(PROMPT)[None], backend.init_cache(1))
        caches.append(cache)
        out[i].append(logits[:, -1])
    for step in range(DECODE):
        for i in range(2):
            logits, caches[i] = backend.forward(out[i][-1].argmax(-1)[:, None], np.array([[PROMPT + step]]), caches[i])
            out[i].append(logits[:, -1])
    for i in range(2):
        np.testing.assert_array_equal(np.stack(out[i]), kept[i])
    assert caches[0].step_binding is not caches[1].step_binding


def test_a_cache_forked_by_copying_its_rings_steps_its_own_rings(wide_graphs):
    """A caller may branch a cache whose rings are updated in place by copying them
    (dataclasses.replace keeps the kept binding along): the copy's step writes into the copy."""
    import dataclasses

    import onnxruntime as ort

    backend = OrtBackend.from_onnx(wide_graphs[0])
    ids = np.random.default_rng(4).integers(0, 256, (1, PROMPT))
    _, cache = backend.forward(ids, np.arange(PROMPT)[None], backend.init_cache(1))
    _, cache = backend.forward(np.array([[5]]), np.array([[PROMPT]]), cache)  # now with a kept binding

    def copy(values):
        return [ort.OrtValue.ortvalue_from_numpy(v.numpy().copy()) for v in values]
    fork = dataclasses.replace(cache, keys=copy(cache.keys), values=copy(cache.values))
    assert fork.step_binding is cache.step_binding
    before = [k.numpy().copy() for k in cache.keys]
    branch, forked = backend.forward(np.array([[7]]), np.array([[PROMPT + 1]]), fork)
    ring = backend.kv_cache[0].slots
    assert all(np.array_equal(k.numpy(), b) for k, b in zip(cache.keys, before))  # the original's rings untouched
    assert not np.array_equal(forked.keys[0].numpy()[:, :, (PROMPT + 1) % ring], before[0][:, :, (PROMPT + 1) % ring])
    main, _ = backend.forward(np.array([[9]]), np.array([[PROMPT + 1]]), cache)
    for token, got in ((7, branch), (9, main)):
        seq = np.concatenate([ids, [[5, token]]], axis=1)
        whole, _ = backend.forward(seq, np.arange(PROMPT + 2)[None], backend.init_cache(1))
        np.testing.assert_allclose(got[:, -1], whole[:, -1], rtol=0, atol=1e-5 * np.abs(whole).max())


def test_batch_of_several_new_tokens_after_a_past_is_refused(wide_graphs):
    backend = OrtBackend.from_onnx(wide_graphs[0])
    _, cache = backend.forward(np.ones((2, 3), np.int64), np.tile(np.arange(3), (2, 1)), backend.init_cache(2))
    with pytest.raises(MoecError, match=r"2 new tokens after 3 cached ones for a batch of 2: .*GroupQueryAttention "
                                         r"\(layers 0,1,2,3\) runs several new tokens after a past for one sequence only"):
        backend.forward(np.ones((2, 2), np.int64), np.tile(np.arange(3, 5), (2, 1)), cache)


def test_a_cache_updated_in_place_cannot_be_fed_twice(wide_graphs):
    backend = OrtBackend.from_onnx(wide_graphs[0])
    cache = backend.init_cache(1)
    _, new = backend.forward(np.ones((1, 3), np.int64), np.arange(3)[None], cache)
    assert cache.consumed and not new.consumed
    with pytest.raises(MoecError, match="updated in place by an earlier step .* pass the cache that step returned"):
        backend.forward(np.ones((1, 1), np.int64), np.array([[3]]), cache)


def test_a_damaged_gqa_layer_list_is_refused(wide_graphs):
    meta = json.loads(contract.sidecar_path(wide_graphs[0]).read_text())
    with pytest.raises(MoecError, match=r"gqa_layers must list distinct layer indices below 4, got \[0, 9\]"):
        OrtBackend.from_onnx(wide_graphs[0], metadata=dict(meta, gqa_layers=[0, 9]))
