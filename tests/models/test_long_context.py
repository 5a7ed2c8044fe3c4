"""Chunked-attention layers with a ring cache of one attention chunk, across many chunks.

Against transformers (fp32: logits within 1e-4, greedy tokens equal) for prompts and generations
that cross 10-50 chunks on tiny configs, and once at Llama 4's real chunk of 8192 past 16384
tokens; and the ring against the full cache (the layout before rings) within 1e-6 at every step,
through chunked prefill with pieces that do not line up with the attention chunks.
"""

from __future__ import annotations

import pytest
import torch

from hf_reference import LLAMA3_ROPE, make_hf_model, save_hf

from moec.models import load_pretrained
from moec.models.llama4 import SCORE_BUDGET, ring_attention_mask, ring_update_index

TOL = 1e-4
# Ring vs full cache: the same keys reach softmax in another order (slot p mod R, not p), so
# sums round differently: 1e-6 of the logits' scale (about 8 fp32 ulps), not bit equality.
RING_RTOL = 1e-6


def _greedy_with_cache(model, prompt_BS, new_tokens, pieces=None):
    """Prefill (in ``pieces`` when given) then greedy decode; logits of every position."""
    B, S = prompt_BS.shape
    sizes = pieces or [S]
    assert sum(sizes) == S
    out, past, start = [], None, 0
    with torch.no_grad():
        for n in sizes:
            pos = torch.arange(start, start + n)[None].expand(B, n)
            logits, past = model(prompt_BS[:, start : start + n], pos, past)
            out.append(logits)
            start += n
        seq = prompt_BS
        for _ in range(new_tokens):
            token = out[-1][:, -1:].argmax(-1)
            seq = torch.cat((seq, token), dim=1)
            logits, past = model(token, torch.full_like(token, start), past)
            out.append(logits)
            start += 1
    return torch.cat(out, dim=1), seq, past


@pytest.mark.parametrize("chunk, chunks, new", [(8, 50, 12), (16, 10, 20)])
def test_many_chunks_match_transformers(chunk, chunks, new, tmp_path):
    """A prompt of ``chunks`` attention chunks (minus a few tokens, so decode crosses a boundary),
    greedy generation through the ring cache; transformers' one pass over the whole sequence."""
    hf = make_hf_model(
        seed=chunk, attention_chunk_size=chunk, rope_parameters=LLAMA3_ROPE, max_position_embeddings=1024
    )
    model = load_pretrained(save_hf(hf, tmp_path / "ckpt"))
    assert model.ring_slots == chunk and ("chunked", chunk) in model.cache_kinds()
    S = chunk * chunks - new // 2
    prompt = torch.randint(0, hf.config.vocab_size, (2, S), generator=torch.Generator().manual_seed(chunk))
    logits, seq, past = _greedy_with_cache(model, prompt, new)
    with torch.no_grad():
        ref = hf(seq).logits
    assert seq.shape[1] == S + new and seq.shape[1] > chunk * chunks
    assert (logits - ref).abs().max().item() <= TOL
    # Every generated token is transformers' greedy choice at that position.
    assert torch.equal(seq[:, S:], ref[:, S - 1 : -1].argmax(-1))
    assert len(set(seq[0, S:].tolist())) > 1, "degenerate generation proves little"
    for (k, _), (kind, slots) in zip(past, model.cache_kinds()):
        assert k.shape[2] == (chunk if kind == "chunked" else S + new)


def test_real_chunk_size_past_16384_tokens(tmp_path):
    """Llama 4's chunk (8192) on a tiny hidden size: a 16390-token prompt and decode steps past
    16384 (the third chunk), against transformers' SDPA path (its eager path would hold the
    [B, N, S, S] scores). moec's eager reference runs in query blocks under SCORE_BUDGET."""
    hf = make_hf_model(
        seed=3,
        vocab_size=64,
        hidden_size=16,
        intermediate_size=8,
        intermediate_size_mlp=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=2,
        attention_chunk_size=8192,
        floor_scale=8192,
        max_position_embeddings=16400,
    )
    hf.config._attn_implementation = "sdpa"
    model = load_pretrained(save_hf(hf, tmp_path / "ckpt"))
    assert model.cache_kinds() == [("chunked", 8192), ("full", None)]
    S, new = 16380, 8
    prompt = torch.randint(0, 64, (1, S), generator=torch.Generator().manual_seed(5))
    assert 1 * 2 * S * S > SCORE_BUDGET  # the prompt really runs in several query blocks
    logits, seq, _ = _greedy_with_cache(model, prompt, new)
    with torch.no_grad():
        ref = hf(seq).logits
    assert seq.shape[1] > 16384
    assert (logits - ref).abs().max().item() <= TOL
    assert torch.equal(seq[:, S:], ref[:, S - 1 : -1].argmax(-1))


@pytest.fixture(scope="module")
def ring_and_full(demo_ckpt):
    ring = load_pretrained(demo_ckpt)
    full = load_pretrained(demo_ckpt)
    full.ring_slots = None
    return ring, full


@pytest.mark.parametrize("pieces", [[61], [5, 13, 3, 27, 1, 12], [9, 9, 9, 9, 9, 16]])
def test_ring_equals_full_cache_every_step(ring_and_full, pieces):
    """Chunk 8 (the demo preset): prefill in pieces that straddle chunk boundaries, then decode
    across 3 more chunks; every step's logits within 1e-6 and the same greedy tokens."""
    ring, full = ring_and_full
    assert ring.ring_slots == 8 and full.cache_kinds() == [("full", None)] * 4
    prompt = torch.randint(0, 256, (2, sum(pieces)), generator=torch.Generator().manual_seed(len(pieces)))
    r_logits, r_seq, r_past = _greedy_with_cache(ring, prompt, 24, pieces)
    f_logits, f_seq, f_past = _greedy_with_cache(full, prompt, 24, pieces)
    assert torch.equal(r_seq, f_seq)
    diff = (r_logits - f_logits).abs().max().item()
    assert diff <= RING_RTOL * f_logits.abs().max().item(), diff
    # The ring holds the last 8 positions of the full cache, position p at slot p mod 8.
    end = r_seq.shape[1]
    positions = torch.arange(end - 8, end)
    for layer in range(3):
        ring_k, full_k = r_past[layer][0], f_past[layer][0]
        scale = full_k.abs().max().item()
        torch.testing.assert_close(ring_k[:, :, positions % 8], full_k[:, :, positions], rtol=0, atol=RING_RTOL * scale)
    scale = f_past[3][0].abs().max().item()
    torch.testing.assert_close(r_past[3][0], f_past[3][0], rtol=0, atol=RING_RTOL * scale)


def test_ring_mask_and_index_follow_the_definition():
    """Slot j holds the newest past position p with p mod R == j; a query sees it only inside its
    chunk; after the step slot j keeps the newest of (its old position, the new ones)."""
    R = C = 4
    for start in range(0, 14):
        for S in range(1, 9):
            pos = torch.arange(start, start + S)[None]
            mask = ring_attention_mask(pos, R, C, torch.float32)[0, 0]
            index = ring_update_index(pos, R)
            assert mask.shape == (S, R + S)
            held = {j: max((p for p in range(start) if p % R == j), default=None) for j in range(R)}
            for i in range(S):
                q = start + i
                for j in range(R):
                    p = held[j]
                    assert (mask[i, j] == 0) == (p is not None and p // C == q // C), (start, S, i, j)
                for j in range(S):
                    k = start + j
                    assert (mask[i, R + j] == 0) == (k <= q and k // C == q // C)
            for j in range(R):
                newest = max((p for p in range(start, start + S) if p % R == j), default=None)
                assert index[j].item() == (R + newest - start if newest is not None else j)


def test_eager_attention_stays_within_the_score_budget(demo_ckpt, monkeypatch):
    """A prompt whose [B, N, S, T] scores exceed SCORE_BUDGET runs in query blocks: no softmax
    input past the budget, the same logits as one unblocked pass (a budget that fits it all)."""
    from moec.models import llama4

    model = load_pretrained(demo_ckpt)
    prompt = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(7))
    largest = [0]
    softmax = torch.softmax

    def recording_softmax(x, *args, **kwargs):
        largest[0] = max(largest[0], x.numel())
        return softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", recording_softmax)
    with torch.no_grad():
        whole, _ = model(prompt)
        unbounded = largest[0]
        budget = 2 * 4 * 10 * 100  # B x N x 10 queries x 100 keys
        monkeypatch.setattr(llama4, "SCORE_BUDGET", budget)
        largest[0] = 0
        blocked, present = model(prompt)
    assert unbounded > budget >= largest[0] > 0
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-6 * whole.abs().max().item())
    assert present[3][0].shape[2] == 100 and present[0][0].shape[2] == 8
