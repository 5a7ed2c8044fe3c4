"""ONNX Runtime backend: one-token steps through the binding kept across a cache's steps
(runtime/ort_backend.py, ``_StepBinding``) give the numbers a binding built afresh gives, on the
demo export (three chunked rings copied each step and one full cache); logits a caller keeps stay
its own; caches of two sequences stepped in turn, or two steps from one cache, do not mix.
The same on rings updated in place: tests/runtime/test_ort_backend_gqa.py."""

from __future__ import annotations

import numpy as np
import pytest

from moec.runtime.ort_backend import OrtBackend

PROMPT, DECODE = 11, 14  # decode crosses the demo's chunk of 8 twice: the rings wrap


def decode(backend, ids_BS, steps, kept=True):
    """Logits [steps + 1, B, V] of the prefill's last position and each greedy step, and the last cache.
    ``kept=False`` takes ONNX Runtime's general path at every step (a binding built afresh)."""
    B, S = ids_BS.shape
    logits, cache = backend.forward(ids_BS, np.tile(np.arange(S), (B, 1)), backend.init_cache(B))
    out = [logits[:, -1]]
    for step in range(steps):
        token = out[-1].argmax(-1)[:, None]
        if not kept:
            backend._logits_np = None  # the general path: what one-token steps took before
        try:
            logits, cache = backend.forward(token, np.full((B, 1), S + step), cache)
        finally:
            backend._logits_np = np.float32
        out.append(logits[:, -1])
    return np.stack(out), cache


@pytest.fixture(scope="module")
def backend(demo_onnx):
    return OrtBackend.from_onnx(demo_onnx)


@pytest.mark.parametrize("batch", [1, 2])
def test_kept_binding_equals_a_fresh_one(backend, batch):
    assert not backend._in_place and [c.kind for c in backend.kv_cache] == ["chunked"] * 3 + ["full"]
    ids = np.random.default_rng(batch).integers(0, backend.vocab_size, size=(batch, PROMPT))
    kept, kept_cache = decode(backend, ids, DECODE)
    fresh, fresh_cache = decode(backend, ids, DECODE, kept=False)
    np.testing.assert_allclose(kept, fresh, rtol=0, atol=1e-6 * np.abs(fresh).max())
    assert kept_cache.step_binding is not None and fresh_cache.step_binding is None
    # The ring keeps its 8 slots, the full cache grew by every token.
    assert kept_cache.keys[0].shape() == fresh_cache.keys[0].shape() and kept_cache.keys[0].shape()[2] == 8
    assert kept_cache.keys[3].shape()[2] == PROMPT + DECODE == kept_cache.past_len


def test_logits_a_caller_keeps_are_not_overwritten_by_the_next_step(backend):
    ids = np.arange(1, PROMPT + 1)[None]
    _, cache = backend.forward(ids, np.arange(PROMPT)[None], backend.init_cache(1))
    first, cache = backend.forward(np.array([[5]]), np.array([[PROMPT]]), cache)
    kept = first.copy()
    second, _ = backend.forward(np.array([[6]]), np.array([[PROMPT + 1]]), cache)
    assert np.array_equal(first, kept) and not np.array_equal(first, second)


def test_two_sequences_stepped_in_turn_equal_each_alone(backend):
    a_ids, b_ids = np.arange(3, 3 + PROMPT)[None], np.arange(40, 40 + PROMPT)[None]
    alone_a, _ = decode(backend, a_ids, DECODE)
    alone_b, _ = decode(backend, b_ids, DECODE)
    caches, out = {}, {"a": [], "b": []}
    for name, ids in (("a", a_ids), ("b", b_ids)):
        logits, caches[name] = backend.forward(ids, np.arange(PROMPT)[None], backend.init_cache(1))
        out[name].append(logits[:, -1])
    for step in range(DECODE):
        for name in ("a", "b"):
            token = out[name][-1].argmax(-1)[:, None]
            logits, caches[name] = backend.forward(token, np.array([[PROMPT + step]]), caches[name])
            out[name].append(logits[:, -1])
    np.testing.assert_array_equal(np.stack(out["a"]), alone_a)
    np.testing.assert_array_equal(np.stack(out["b"]), alone_b)


def test_two_steps_from_one_cache_branch_without_mixing(backend):
    """A cache no step updated in place can be stepped twice (two candidate tokens): each branch
    continues as if it had been the only one."""
    ids = np.arange(7, 7 + PROMPT)[None]
    _, cache = backend.forward(ids, np.arange(PROMPT)[None], backend.init_cache(1))
    _, cache = backend.forward(np.array([[9]]), np.array([[PROMPT]]), cache)  # the kept binding now exists
    left_1, left = backend.forward(np.array([[20]]), np.array([[PROMPT + 1]]), cache)
    right_1, right = backend.forward(np.array([[30]]), np.array([[PROMPT + 1]]), cache)
    left_2, _ = backend.forward(np.array([[21]]), np.array([[PROMPT + 2]]), left)
    right_2, _ = backend.forward(np.array([[31]]), np.array([[PROMPT + 2]]), right)
    whole = np.concatenate([ids, [[9, 20, 21]]], axis=1), np.concatenate([ids, [[9, 30, 31]]], axis=1)
    for (one, two), seq in zip(((left_1, left_2), (right_1, right_2)), whole):
        full, _ = backend.forward(seq, np.arange(seq.shape[1])[None], backend.init_cache(1))
        scale = np.abs(full).max()
        np.testing.assert_allclose(one[:, -1], full[:, -2], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(two[:, -1], full[:, -1], rtol=0, atol=1e-5 * scale)
