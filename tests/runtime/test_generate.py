"""The generation loop against a tiny numpy backend whose next token is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.common.errors import MoecError
from moec.runtime.backend import Backend
from moec.runtime.generate import GenerationConfig, generate, sample_next

V = 11


class _Cache:
    def __init__(self, tokens_BP: np.ndarray):
        self.tokens_BP = tokens_BP

    @property
    def past_len(self) -> int:
        return self.tokens_BP.shape[1]


class FakeBackend:
    """Logits peak at (sum of all tokens seen so far + position) mod V, so every token depends
    on the whole cache: a loop that loses, duplicates or misplaces a token changes the output.
    It also checks the positions the loop hands it."""

    name = "fake"

    def __init__(self, max_positions: int = 64, eos_token_ids: tuple[int, ...] = (), batch_bias=None):
        self.max_positions = max_positions
        self.eos_token_ids = eos_token_ids
        self.calls: list[tuple[int, int]] = []  # (new_tokens, past_len)
        self.batch_bias = batch_bias

    def init_cache(self, batch_size: int) -> _Cache:
        return _Cache(np.zeros((batch_size, 0), dtype=np.int64))

    def forward(self, input_ids_BS, position_ids_BS, cache):
        assert input_ids_BS.dtype == np.int64 and position_ids_BS.dtype == np.int64
        B, S = input_ids_BS.shape
        P = cache.past_len
        np.testing.assert_array_equal(position_ids_BS, np.broadcast_to(P + np.arange(S), (B, S)))
        assert P + S <= self.max_positions
        self.calls.append((S, P))
        tokens_BT = np.concatenate([cache.tokens_BP, input_ids_BS], axis=1)
        logits_BSV = np.zeros((B, S, V), dtype=np.float32)
        for s in range(S):
            target_B = (tokens_BT[:, : P + s + 1].sum(axis=1) + P + s) % V
            if self.batch_bias is not None:
                target_B = (target_B + self.batch_bias) % V
            logits_BSV[np.arange(B), s, target_B] = 5.0
        return logits_BSV, _Cache(tokens_BT)

    def describe(self):
        return {"backend": "fake"}


def expected_greedy(prompt: list[int], n: int, bias: int = 0) -> list[int]:
    seq = list(prompt)
    out = []
    for _ in range(n):
        t = (sum(seq) + len(seq) - 1 + bias) % V
        out.append(t)
        seq.append(t)
    return out


def test_fake_backend_satisfies_protocol():
    assert isinstance(FakeBackend(), Backend)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_greedy_follows_the_model_and_feeds_positions_in_order(n):
    be = FakeBackend()
    res = generate(be, [3, 1, 4, 1, 5], GenerationConfig(max_new_tokens=n))
    assert res.new_tokens == [expected_greedy([3, 1, 4, 1, 5], n)]
    assert res.finish_reasons == ["length"]
    # One prefill of the whole prompt, then one single-token step per generated token but the last.
    assert be.calls == [(5, 0)] + [(1, 5 + i) for i in range(n - 1)]
    assert len(res.decode_step_s) == n - 1 and res.prefill_s > 0
    assert res.sequences == [[3, 1, 4, 1, 5] + res.new_tokens[0]]


def test_batch_rows_are_independent():
    be = FakeBackend(batch_bias=np.array([0, 3]))
    res = generate(be, [[1, 2, 3], [1, 2, 3]], GenerationConfig(max_new_tokens=6))
    assert res.new_tokens == [expected_greedy([1, 2, 3], 6, 0), expected_greedy([1, 2, 3], 6, 3)]


def test_stops_on_eos_and_keeps_it():
    gen = expected_greedy([2, 2], 10)
    eos = gen[3]
    first = gen.index(eos)
    res = generate(FakeBackend(eos_token_ids=(eos,)), [2, 2], GenerationConfig(max_new_tokens=10))
    assert res.new_tokens == [gen[: first + 1]]
    assert res.finish_reasons == ["eos"]
    res = generate(FakeBackend(eos_token_ids=(eos,)), [2, 2], GenerationConfig(max_new_tokens=10, stop_on_eos=False))
    assert res.new_tokens == [gen]


def test_batch_stops_rows_separately():
    gen0 = expected_greedy([1, 2, 3], 8, 0)
    gen1 = expected_greedy([1, 2, 3], 8, 3)
    eos = gen0[1]
    assert eos not in gen1[:8] or gen1.index(eos) > 1  # row 1 runs longer than row 0
    be = FakeBackend(eos_token_ids=(eos,), batch_bias=np.array([0, 3]))
    res = generate(be, [[1, 2, 3], [1, 2, 3]], GenerationConfig(max_new_tokens=8))
    assert res.new_tokens[0] == gen0[: gen0.index(eos) + 1]
    cut1 = gen1.index(eos) + 1 if eos in gen1 else 8
    assert res.new_tokens[1] == gen1[:cut1]


def test_prompt_longer_than_max_positions_is_an_error():
    with pytest.raises(MoecError, match="at most 4 positions"):
        generate(FakeBackend(max_positions=4), [1, 2, 3, 4, 5], GenerationConfig(max_new_tokens=1))


def test_generation_stops_at_max_positions():
    be = FakeBackend(max_positions=8)
    res = generate(be, [1, 2, 3, 4, 5], GenerationConfig(max_new_tokens=10))
    assert len(res.new_tokens[0]) == 3 and res.finish_reasons == ["max_positions"]
    assert max(s + p for s, p in be.calls) <= 8


@pytest.mark.parametrize("bad", [[], [[]], [[1, 2], [3]], [-1, 2], [[[1]]]])
def test_bad_prompts(bad):
    with pytest.raises(MoecError):
        generate(FakeBackend(), bad, GenerationConfig(max_new_tokens=1))


@pytest.mark.parametrize(
    "kwargs", [dict(max_new_tokens=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=float("nan")), dict(temperature=-1.0), dict(seed=-1)]
)
def test_bad_config(kwargs):
    with pytest.raises(MoecError):
        GenerationConfig(**kwargs)


def test_sampling_is_reproducible_per_seed():
    cfg = GenerationConfig(max_new_tokens=12, temperature=5.0, seed=7)
    a = generate(FakeBackend(), [1, 2], cfg).new_tokens
    b = generate(FakeBackend(), [1, 2], cfg).new_tokens
    c = generate(FakeBackend(), [1, 2], GenerationConfig(max_new_tokens=12, temperature=5.0, seed=8)).new_tokens
    assert a == b
    assert a != c
    assert a != [expected_greedy([1, 2], 12)]  # temperature 5 over 11 tokens: far from greedy


def test_top_k_1_and_tiny_top_p_are_greedy():
    greedy = [expected_greedy([4, 4], 6)]
    for cfg in (
        GenerationConfig(max_new_tokens=6, temperature=10.0, top_k=1, seed=1),
        GenerationConfig(max_new_tokens=6, temperature=10.0, top_p=1e-6, seed=1),
    ):
        assert generate(FakeBackend(), [4, 4], cfg).new_tokens == greedy


def _reference_probs(logits_V, temperature, top_k, top_p):
    z = logits_V.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    p = np.exp(z[order] - z[order].max())
    if top_k:
        p[top_k:] = 0
    p /= p.sum()
    if top_p < 1:
        before = np.cumsum(p) - p
        p[before >= top_p] = 0
        p /= p.sum()
    out = np.zeros_like(p)
    out[order] = p
    return out


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    top_k=st.sampled_from([0, 2, 4]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
)
def test_sampling_frequencies_match_the_filtered_softmax(seed, temperature, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits_V = rng.normal(size=6).astype(np.float32) * 2
    want = _reference_probs(logits_V, temperature, top_k, top_p)
    n = 4000
    logits_BV = np.broadcast_to(logits_V, (n, 6))
    got = sample_next(logits_BV, GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p), rng)
    freq = np.bincount(got, minlength=6) / n
    # Tokens filtered out are never drawn; the rest within 5 standard errors of their probability,
    # plus 4 draws: a token of probability 1e-5 is drawn once in 4000 about 4 % of the time, which
    # 5 standard errors (0.2 draws there) would call a failure. P(5 draws or more) < 1e-9 there.
    assert (freq[want == 0] == 0).all()
    se = np.sqrt(want * (1 - want) / n)
    assert (np.abs(freq - want) <= 5 * se + 4 / n).all(), (freq, want)


@pytest.mark.parametrize("chunk, calls", [(4, [(4, 0), (4, 4), (2, 8)]), (5, [(5, 0), (5, 5)]), (64, [(10, 0)]),
                                          (1, [(1, p) for p in range(10)])])
def test_long_prompt_is_prefilled_in_chunks_of_the_backends_limit(chunk, calls):
    backend = FakeBackend()
    backend.max_new_tokens_per_step = chunk
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    res = generate(backend, prompt, GenerationConfig(max_new_tokens=3))
    assert res.new_tokens == [expected_greedy(prompt, 3)]
    assert backend.calls[: len(calls)] == calls and backend.calls[len(calls):] == [(1, 10), (1, 11)]


def test_chunked_prefill_matches_one_step_prefill_on_onnx_runtime(demo_onnx):
    """The real cache path: the demo export on ONNX Runtime, its prompt fed in chunks of 5, gives
    the same greedy tokens and the same logits (prefill's last position and every decode step)."""
    from moec.runtime.ort_backend import OrtBackend

    class Recording:
        def __init__(self, inner, chunk=None):
            self.inner, self.logits = inner, []
            self.name, self.max_positions, self.eos_token_ids = inner.name, inner.max_positions, ()
            if chunk is not None:
                self.max_new_tokens_per_step = chunk
            self.steps = []

        def init_cache(self, b):
            return self.inner.init_cache(b)

        def forward(self, ids, pos, cache):
            logits, cache = self.inner.forward(ids, pos, cache)
            self.steps.append(ids.shape[1])
            self.logits.append(logits[:, -1, :])
            return logits, cache

    ort = OrtBackend.from_onnx(demo_onnx)
    prompt = np.random.default_rng(1).integers(0, 100, size=(2, 13))
    whole, chunked = Recording(ort), Recording(ort, chunk=5)
    cfg = GenerationConfig(max_new_tokens=4, stop_on_eos=False)
    a, b = generate(whole, prompt, cfg), generate(chunked, prompt, cfg)
    assert chunked.steps == [5, 5, 3, 1, 1, 1] and whole.steps == [13, 1, 1, 1]
    assert a.new_tokens == b.new_tokens
    # Logits after the whole prompt (the last chunk's) and after every decode step agree.
    for x, y in zip(whole.logits, chunked.logits[2:]):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
