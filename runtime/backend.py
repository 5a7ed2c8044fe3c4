"""The interface every runtime backend implements (torch reference, ONNX Runtime, TensorRT).

The generation loop (``moec.runtime.generate``) only talks to this interface, so sampling,
stopping, timing and KV-cache bookkeeping are written once and tested on the CPU backends; a
backend only knows how to run one model step.

Layouts: ``input_ids_BS`` and ``position_ids_BS`` are int64 numpy arrays [batch, new_tokens];
the returned ``logits_BSV`` is a float32 numpy array [batch, new_tokens, vocab]. The cache is
backend-native (torch tensors, ORT values, device buffers) and opaque to the loop; it holds the
past keys/values [B, KVH, P, D] per layer and its ``past_len`` (P).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class KVCache(Protocol):
    @property
    def past_len(self) -> int: ...


@runtime_checkable
class Backend(Protocol):
    name: str  # "torch", "ort", "trt"
    max_positions: int  # longest sequence (prompt + generated) the artifact accepts
    eos_token_ids: tuple[int, ...]
    # Optional: the most new tokens one forward() takes (a TensorRT engine's prefill profile); the
    # loop prefills a longer prompt in chunks. Absent or None: no limit. Read with getattr, so a
    # backend without it still satisfies the protocol.
    # max_new_tokens_per_step: int | None

    def init_cache(self, batch_size: int) -> Any:
        """An empty cache (past_len 0) for ``batch_size`` sequences."""

    def forward(self, input_ids_BS: np.ndarray, position_ids_BS: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """Run the new tokens against ``cache``; return float32 logits [B, S, V] and the cache
        extended by these S tokens."""

    def describe(self) -> dict[str, str]:
        """Device and software versions, for benchmark results."""
