"""Incremental decoding through the plain-tensor KV cache equals full recomputation, across
attention-chunk boundaries (the demo preset's chunk is 8 tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.common.errors import MoecError
from moec.models import load_pretrained
from moec.models.llama4 import attention_masks
from moec.models.torch_backend import TorchBackend

TOL = 1e-5


@pytest.fixture(scope="module")
def demo_model(demo_ckpt):
    return load_pretrained(demo_ckpt)


def test_greedy_decode_equals_full_recomputation(demo_model):
    """Greedy tokens through the cache, one at a time, for 3 chunk lengths; each step's logits equal
    those of re-running the whole sequence without a cache."""
    chunk = demo_model.config.attention_chunk_size
    seq = torch.tensor([[256, 72, 105, 33, 10]])
    with torch.no_grad():
        logits, past = demo_model(seq)
        for _ in range(3 * chunk):
            token = logits[:, -1:].argmax(-1)
            full, _ = demo_model(torch.cat((seq, token), dim=1))
            logits, past = demo_model(token, past_key_values=past)
            assert (logits[:, -1] - full[:, -1]).abs().max().item() <= TOL
            assert full[:, -2].argmax(-1).item() == token.item()
            seq = torch.cat((seq, token), dim=1)
    # Layer 0 uses chunked attention: a ring of one chunk; layer 3 (NoPE) keeps every position.
    assert past[0][0].shape[2] == chunk and past[3][0].shape[2] == seq.shape[1]
    assert len(set(seq[0, 5:].tolist())) > 1, "degenerate generation proves little"


@settings(max_examples=12, deadline=None)
@given(
    splits=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_any_prefill_split_equals_one_pass(demo_model, splits, batch, seed):
    """Feeding the sequence in arbitrary pieces (chunked prefill and multi-token decode continuing
    from a cache, pieces straddling chunk boundaries) gives the one-pass logits."""
    total = sum(splits)
    ids = torch.randint(0, demo_model.config.vocab_size, (batch, total), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full, full_present = demo_model(ids)
        past, start, pieces = demo_model.empty_cache(batch), 0, []
        for n in splits:
            logits, past = demo_model(ids[:, start : start + n], past_key_values=past)
            pieces.append(logits)
            start += n
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL
    for (k, v), (fk, fv) in zip(past, full_present):
        assert (k - fk).abs().max().item() <= TOL and (v - fv).abs().max().item() <= TOL


def test_positions_default_to_past_length(demo_model):
    ids = torch.tensor([[256, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        _, past = demo_model(ids[:, :6])
        implicit, _ = demo_model(ids[:, 6:], past_key_values=past)
        explicit, _ = demo_model(ids[:, 6:], torch.arange(6, 11)[None], past_key_values=past)
    assert torch.equal(implicit, explicit)


@given(chunk=st.integers(1, 6), past=st.integers(0, 14), new=st.integers(1, 6))
@settings(max_examples=40, deadline=None)
def test_masks_follow_the_definition(chunk, past, new):
    pos = torch.arange(past, past + new)[None]
    causal, chunked = attention_masks(pos, past, chunk, torch.float32)
    assert causal.shape == chunked.shape == (1, 1, new, past + new)
    for i in range(new):
        q = past + i
        for j in range(past + new):
            assert (causal[0, 0, i, j] == 0) == (j <= q)
            assert (chunked[0, 0, i, j] == 0) == (j <= q and j // chunk == q // chunk)


def test_torch_backend_steps_match_model(demo_ckpt, demo_model):
    from moec.runtime.backend import Backend

    backend = TorchBackend.from_checkpoint(demo_ckpt)
    assert isinstance(backend, Backend)
    assert backend.name == "torch" and backend.eos_token_ids == (257, 258) and backend.max_positions == 512
    ids = np.array([[256, 5, 6, 7, 8, 9, 10, 11, 12, 13], [256, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    cache = backend.init_cache(2)
    assert cache.past_len == 0
    prefill, cache = backend.forward(ids[:, :7], np.tile(np.arange(7), (2, 1)), cache)
    step, cache = backend.forward(ids[:, 7:], np.tile(np.arange(7, 10), (2, 1)), cache)
    assert cache.past_len == 10 and prefill.dtype == np.float32
    with torch.no_grad():
        full = demo_model(torch.from_numpy(ids))[0].numpy()
    assert np.abs(np.concatenate((prefill, step), axis=1) - full).max() <= TOL
    assert set(backend.describe()) >= {"backend", "torch", "device", "dtype"}


def test_torch_backend_casts_on_load(demo_ckpt):
    backend = TorchBackend.from_checkpoint(demo_ckpt, dtype="bf16")
    assert backend.dtype == torch.bfloat16 and backend.describe()["dtype"] == "bfloat16"
    logits, cache = backend.forward(np.array([[256, 1, 2]]), np.array([[0, 1, 2]]), backend.init_cache(1))
    assert logits.dtype == np.float32 and cache.layers[0][0].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "ids, pos, batch, match",
    [
        (np.array([[1, 2]]), np.array([[0, 1, 2]]), 1, "must both be"),
        (np.array([[1, 2]]), np.array([[0, 1]]), 2, "batch"),
        (np.array([[1, 264]]), np.array([[0, 1]]), 1, r"token ids must lie in \[0, 264\), got 264 \(at position 1\)$"),
        (np.zeros((1, 513), dtype=np.int64), np.arange(513)[None], 1, "exceeds"),
    ],
)
def test_torch_backend_rejects_bad_steps(demo_ckpt, ids, pos, batch, match):
    backend = TorchBackend.from_checkpoint(demo_ckpt)
    with pytest.raises(MoecError, match=match):
        backend.forward(ids, pos, backend.init_cache(batch))
