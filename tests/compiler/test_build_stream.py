"""The build's memory-mapped weights: pages TensorRT-RTX has read leave the process's RSS (the
pager), the bytes read back are the file's, and the pager stops with the map."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from moec.compiler.build import stream as build_stream
from moec.compiler.build.stream import MappedWeights

SIZE = 32 << 20


def _mapped_rss(path) -> int:
    """Bytes of ``path``'s mapping resident in this process (/proc/self/smaps)."""
    total, inside, name = 0, False, str(path.resolve())
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = head[-1] == name
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "model.onnx.data"
    path.write_bytes(np.arange(SIZE // 4, dtype=np.uint32).tobytes())
    return path


def _read_all(weights: MappedWeights) -> np.ndarray:
    return np.frombuffer(weights._map, dtype=np.uint32).copy()


def test_release_drops_read_pages_and_keeps_the_bytes(data_file, monkeypatch):
    monkeypatch.setattr(build_stream, "PAGE_RELEASE_S", 3600.0)  # only the explicit release below
    weights = MappedWeights(data_file)
    try:
        first = _read_all(weights)
        assert _mapped_rss(data_file) >= SIZE // 2  # reading made the pages resident (must-fire side)
        weights.release_pages()
        assert _mapped_rss(data_file) < SIZE // 8
        np.testing.assert_array_equal(_read_all(weights), first)
        np.testing.assert_array_equal(first[:4], [0, 1, 2, 3])
    finally:
        weights.close()


def test_pager_releases_without_being_asked(data_file):
    weights = MappedWeights(data_file)
    try:
        _read_all(weights)
        deadline = time.monotonic() + 10
        while _mapped_rss(data_file) >= SIZE // 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _mapped_rss(data_file) < SIZE // 8
    finally:
        weights.close()


def _pagers() -> int:
    return sum(t.name == "moec-weight-pager" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("how", ["close", "drop"])
def test_pager_stops_with_the_map(data_file, how):
    before = _pagers()
    weights = MappedWeights(data_file)
    assert _pagers() == before + 1
    if how == "close":
        weights.close()
    del weights
    gc.collect()
    deadline = time.monotonic() + 10
    while _pagers() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pagers() == before
