"""ONNX Runtime: the ring export's numbers equal the full-cache export's at every step, through
chunked prefill with pieces that do not line up with the attention chunks (demo chunk: 8)."""

from __future__ import annotations

import numpy as np
import pytest

from moec.compiler.export import ExportConfig, export_onnx
from moec.runtime.ort_backend import OrtBackend

# The same keys reach softmax in another order (slot p mod R, not p): 1e-6 of the logits' scale.
RING_RTOL = 1e-6


@pytest.fixture(scope="module")
def full_cache_onnx(demo_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_cache") / "model.onnx"
    export_onnx(demo_ckpt, out, ExportConfig(chunked_cache="full"))
    return out


def _steps(backend, ids_BS, pieces, decode):
    B = ids_BS.shape[0]
    cache, out, start = backend.init_cache(B), [], 0
    for n in pieces:
        logits, cache = backend.forward(ids_BS[:, start : start + n], np.tile(np.arange(start, start + n), (B, 1)), cache)
        out.append(logits)
        start += n
    tokens = []
    for _ in range(decode):
        token = out[-1][:, -1].argmax(-1)[:, None]
        tokens.append(token)
        logits, cache = backend.forward(token, np.full((B, 1), start), cache)
        out.append(logits)
        start += 1
    return out, tokens, cache


@pytest.mark.parametrize("pieces", [[5, 13, 3, 7], [19]])
def test_ring_equals_full_cache_in_ort(demo_onnx, full_cache_onnx, pieces):
    ring, full = OrtBackend.from_onnx(demo_onnx), OrtBackend.from_onnx(full_cache_onnx)
    assert [c.kind for c in ring.kv_cache] == ["chunked"] * 3 + ["full"]
    assert {c.kind for c in full.kv_cache} == {"full"}
    ids = np.random.default_rng(len(pieces)).integers(0, 256, size=(2, sum(pieces)))
    r_out, r_tokens, r_cache = _steps(ring, ids, pieces, 20)  # decode crosses 2-3 chunk boundaries
    f_out, f_tokens, f_cache = _steps(full, ids, pieces, 20)
    for r, f in zip(r_out, f_out):
        assert np.abs(r - f).max() <= RING_RTOL * np.abs(f).max()
    assert all(np.array_equal(a, b) for a, b in zip(r_tokens, f_tokens))
    assert r_cache.keys[0].shape()[2] == 8 and f_cache.keys[0].shape()[2] == sum(pieces) + 20


def test_graph_decides_the_cache_layout(demo_onnx):
    """Metadata without kv_cache (rebuilt from a checkpoint) still gets the graph's rings; metadata
    whose kv_cache contradicts the graph is refused, naming the layer."""
    import json

    from moec.common import contract
    from moec.common.errors import MoecError

    meta = json.loads(contract.sidecar_path(demo_onnx).read_text())
    bare = {k: v for k, v in meta.items() if k != "kv_cache"}
    layout = OrtBackend.from_onnx(demo_onnx, metadata=bare).kv_cache
    assert [(c.kind, c.slots) for c in layout] == [("chunked", 8)] * 3 + [("full", meta["max_positions"])]
    wrong = dict(meta, kv_cache=[dict(e, kind="full", slots=meta["max_positions"]) for e in meta["kv_cache"]])
    with pytest.raises(MoecError, match=r"layer 0's KV cache is full .* past_key.0 is chunked with 8 slots.*re-export"):
        OrtBackend.from_onnx(demo_onnx, metadata=wrong)
