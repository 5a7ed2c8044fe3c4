"""The generation loop every backend shares: prefill, then one decode step per new token.

The loop only talks to ``moec.runtime.backend.Backend``: it hands the backend int64 token and
position arrays and an opaque cache, and gets float32 logits back. Sampling, stopping, timing
and position bookkeeping live here once, so the torch, ONNX Runtime and TensorRT backends
cannot drift apart in how they generate.

Batches are rectangular (every prompt in a batch has the same length; no padding). A sequence
that has emitted EOS keeps being fed EOS so the batch stays rectangular, but its output stops
at (and includes) that EOS; the loop ends when every sequence has stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from moec.common.errors import MoecError
from moec.runtime.backend import Backend


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick and when to stop. Defaults: greedy, 32 new tokens, stop on EOS."""

    max_new_tokens: int = 32
    # temperature 0 means greedy (argmax); top_k/top_p only apply when sampling.
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 0
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise MoecError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.top_k < 0:
            raise MoecError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise MoecError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (np.isfinite(self.temperature) and self.temperature >= 0.0):
            raise MoecError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.seed < 0:
            raise MoecError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationResult:
    """Token ids and timings of one ``generate`` call.

    ``sequences`` holds prompt + generated ids per batch row; ``new_tokens`` only the generated
    ones (cut after EOS). Timings are wall seconds measured around each backend call, including
    the host-side sampling of that step.
    """

    prompt_len: int
    new_tokens: list[list[int]]
    finish_reasons: list[str]  # "eos" | "length" (max_new_tokens) | "max_positions"
    prefill_s: float
    decode_step_s: list[float] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)

    @property
    def sequences(self) -> list[list[int]]:
        return [p + n for p, n in zip(self.prompt_ids, self.new_tokens)]

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.decode_step_s)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput per sequence (steps per second); 0 when no decode step ran."""
        t = sum(self.decode_step_s)
        return len(self.decode_step_s) / t if t > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "finish_reasons": self.finish_reasons,
            "timings": {
                "prefill_s": self.prefill_s,
                "decode_step_s": self.decode_step_s,
                "total_s": self.total_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
            },
        }


def as_prompt_batch(prompt_ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """One prompt (1-D) or a rectangular batch (2-D) as an int64 array [B, S]."""
    try:
        arr = np.asarray(prompt_ids, dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as e:
        raise MoecError(f"prompt ids must be integers in one rectangular batch: {e}") from e
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise MoecError(f"prompt ids must be 1-D or 2-D [batch, tokens], got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MoecError(f"the prompt is empty (shape {arr.shape}); give at least one token id")
    if (arr < 0).any():
        raise MoecError(f"prompt ids must be >= 0, got {int(arr.min())}")
    return arr


def sample_next(logits_BV: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row from the last position's logits (int64 [B]).

    Greedy is argmax. Sampling divides by the temperature, keeps the top_k largest logits, then
    the smallest set of tokens whose probability reaches top_p (always at least the most likely
    one), and draws from the renormalised distribution with ``rng``.
    """
    logits_BV = np.asarray(logits_BV, dtype=np.float32)
    if config.greedy:
        return logits_BV.argmax(axis=-1).astype(np.int64)

    B, V = logits_BV.shape
    scaled_BV = logits_BV.astype(np.float64) / config.temperature
    # Sort once, descending; top-k and top-p are both prefixes of this order.
    order_BV = np.argsort(-scaled_BV, axis=-1, kind="stable")
    sorted_BV = np.take_along_axis(scaled_BV, order_BV, axis=-1)
    keep_BV = np.ones((B, V), dtype=bool)
    if 0 < config.top_k < V:
        keep_BV[:, config.top_k :] = False
    probs_BV = np.exp(sorted_BV - sorted_BV[:, :1])
    probs_BV = np.where(keep_BV, probs_BV, 0.0)
    probs_BV /= probs_BV.sum(axis=-1, keepdims=True)
    if config.top_p < 1.0:
        cum_BV = np.cumsum(probs_BV, axis=-1)
        # A token is kept when the mass before it is still short of top_p.
        keep_BV &= (cum_BV - probs_BV) < config.top_p
        probs_BV = np.where(keep_BV, probs_BV, 0.0)
        probs_BV /= probs_BV.sum(axis=-1, keepdims=True)
    cdf_BV = np.cumsum(probs_BV, axis=-1)
    u_B = rng.random(B) * cdf_BV[:, -1]
    idx_B = np.array([np.searchsorted(cdf_BV[b], u_B[b], side="right") for b in range(B)])
    # Guard against u landing exactly on the final cdf value after rounding.
    idx_B = np.minimum(idx_B, keep_BV.sum(axis=-1) - 1)
    return order_BV[np.arange(B), idx_B].astype(np.int64)


def prefill_chunk(backend: Backend, prompt_len: int) -> int:
    """Tokens per prefill step: the whole prompt, unless the backend takes fewer new tokens per
    step (its optional ``max_new_tokens_per_step``, e.g. a TensorRT engine's prefill profile)."""
    limit = getattr(backend, "max_new_tokens_per_step", None)
    if limit is None:
        return prompt_len
    if int(limit) < 1:
        raise MoecError(f"the {backend.name} backend takes {limit} new tokens per step; it needs at least 1")
    return min(prompt_len, int(limit))


def _shared(backend: Backend, next_B: np.ndarray) -> np.ndarray:
    """The tokens every rank feeds next: a multi-rank backend's ``share_tokens`` (rank 0's pick,
    broadcast) where it has one, else this process's own pick."""
    share = getattr(backend, "share_tokens", None)
    return next_B if share is None else share(next_B)


def generate(
    backend: Backend,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
    config: GenerationConfig = GenerationConfig(),
    image_features_NH: np.ndarray | None = None,
) -> GenerationResult:
    """Generate up to ``config.max_new_tokens`` tokens after each prompt.

    The whole sequence (prompt + generated) is capped at ``backend.max_positions``; a prompt
    longer than that is an error, a generation that would pass it stops early with finish
    reason "max_positions". A prompt longer than the backend's ``max_new_tokens_per_step`` (when
    it has one) is prefilled in chunks of that size; ``prefill_s`` covers all of them.

    ``image_features_NH``: one row per image-token position of the prompt (``backend.image_token_id``), in order
    (runtime/image_inputs.py); each prefill chunk gets the rows of its own image tokens.
    """
    prompt_BS = as_prompt_batch(prompt_ids)
    B, S = prompt_BS.shape
    max_pos = int(backend.max_positions)
    if S > max_pos:
        raise MoecError(
            f"the prompt has {S} tokens but this {backend.name} artifact accepts at most {max_pos} positions; "
            "shorten the prompt or export with a larger --max-seq"
        )
    if image_features_NH is not None and B != 1:
        raise MoecError(f"image prompts run one sequence at a time; got a batch of {B}")
    budget = min(config.max_new_tokens, max_pos - S)
    eos = set(int(t) for t in backend.eos_token_ids) if config.stop_on_eos else set()
    rng = np.random.default_rng(config.seed)

    new_tokens: list[list[int]] = [[] for _ in range(B)]
    finished = np.zeros(B, dtype=bool)
    reasons = [""] * B
    step_s: list[float] = []
    prefill_s = 0.0

    if budget > 0:
        cache = backend.init_cache(B)
        positions_BS = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S)).copy()
        chunk = prefill_chunk(backend, S)
        t0 = time.perf_counter()
        # A prompt longer than the backend takes in one step goes in as consecutive chunks, each
        # with the earlier ones as its past: the same cache, and the same last-position logits.
        row = 0
        for start in range(0, S, chunk):
            end = min(start + chunk, S)
            if image_features_NH is None:
                logits_BSV, cache = backend.forward(prompt_BS[:, start:end], positions_BS[:, start:end], cache)
                continue
            # Rows are in row-major (batch, position) order over the whole prompt: one prompt, or chunks of one.
            count = int((prompt_BS[:, start:end] == backend.image_token_id).sum())
            logits_BSV, cache = backend.forward(prompt_BS[:, start:end], positions_BS[:, start:end], cache,
                                                image_features_NH=image_features_NH[row:row + count])
            row += count
        next_B = _shared(backend, sample_next(logits_BSV[:, -1, :], config, rng))
        prefill_s = time.perf_counter() - t0
        pos = S
        while True:
            for b in range(B):
                if finished[b]:
                    continue
                tok = int(next_B[b])
                new_tokens[b].append(tok)
                if tok in eos:
                    finished[b], reasons[b] = True, "eos"
                elif len(new_tokens[b]) >= budget:
                    finished[b] = True
                    reasons[b] = "length" if budget == config.max_new_tokens else "max_positions"
            if finished.all():
                break
            # Finished rows keep decoding their last token so the batch stays rectangular; what
            # they produce is discarded above.
            feed_B1 = next_B[:, None].astype(np.int64)
            t0 = time.perf_counter()
            logits_BSV, cache = backend.forward(feed_B1, np.full((B, 1), pos, dtype=np.int64), cache)
            next_B = _shared(backend, sample_next(logits_BSV[:, -1, :], config, rng))
            step_s.append(time.perf_counter() - t0)
            pos += 1
    else:
        reasons = ["length" if config.max_new_tokens == 0 else "max_positions"] * B

    return GenerationResult(
        prompt_len=S,
        new_tokens=new_tokens,
        finish_reasons=reasons,
        prefill_s=prefill_s,
        decode_step_s=step_s,
        prompt_ids=prompt_BS.tolist(),
    )
