"""The sidecar's per-layer cache kinds (kv_cache) and the KV byte counts read from them or from
an engine's I/O shapes."""

from __future__ import annotations

import json

import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.common.kv_cache import cache_layout, kv_bytes_from_io, kv_bytes_per_sequence
from moec.common.sidecar import read_sidecar

from test_sidecar import GOOD

RINGS = [
    {"layer": 0, "kind": "chunked", "slots": 8},
    {"layer": 1, "kind": "chunked", "slots": 8},
    {"layer": 2, "kind": "chunked", "slots": 8},
    {"layer": 3, "kind": "full", "slots": 512},
]


def _read(tmp_path, meta):
    onnx_path = tmp_path / "model.onnx"
    contract.sidecar_path(onnx_path).write_text(json.dumps(meta))
    return read_sidecar(onnx_path)


def test_layout_is_read_and_defaults_to_full(tmp_path):
    layout = cache_layout(_read(tmp_path, {**GOOD, "kv_cache": RINGS}))
    assert [(c.kind, c.slots, c.ring) for c in layout] == [("chunked", 8, True)] * 3 + [("full", 512, False)]
    # A sidecar from before rings: every layer full, up to max_positions.
    assert {(c.kind, c.slots) for c in cache_layout(_read(tmp_path, GOOD))} == {("full", 512)}


@pytest.mark.parametrize(
    "kv_cache",
    [
        RINGS[:3],  # one per layer
        [*RINGS[:3], {"layer": 3, "kind": "sliding", "slots": 512}],
        [*RINGS[:3], {"layer": 3, "kind": "full", "slots": 0}],
        [*RINGS[:3], {"layer": 3, "kind": "full", "slots": True}],
        [RINGS[1], RINGS[0], *RINGS[2:]],  # out of order
        [*RINGS[:3], {"layer": 3, "kind": "full"}],
        "rings",
    ],
)
def test_bad_kv_cache_is_named(tmp_path, kv_cache):
    with pytest.raises(MoecError, match="kv_cache") as e:
        _read(tmp_path, {**GOOD, "kv_cache": kv_cache})
    assert "re-export" in str(e.value)


def test_bytes_per_kind_by_hand():
    """Demo-like: 2 kv heads x 16 dims, fp32: a slot of one layer is 2 (K, V) x 2 x 16 x 4 = 256 B."""
    layout = cache_layout({**GOOD, "kv_cache": RINGS})
    assert kv_bytes_per_sequence(layout, 100, 2, 16, "fp32") == {"chunked": 3 * 8 * 256, "full": 100 * 256}
    io = [{"name": f"past_{kv}.{i}", "dtype": "float", "shape": [-1, 2, 8 if i < 3 else -1, 16]}
          for i in range(4) for kv in ("key", "value")] + [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]}]
    assert kv_bytes_from_io(io, 100) == kv_bytes_per_sequence(layout, 100, 2, 16, "fp32")
    # An ONNX graph names its dynamic axes instead of -1.
    io[6]["shape"][2] = io[7]["shape"][2] = "past_len"
    assert kv_bytes_from_io(io, 100)["full"] == 100 * 256
