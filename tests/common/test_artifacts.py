"""Atomic artifact writes: all or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from moec.common.artifacts import atomic_dir, atomic_path, sha256_file, write_json_atomic


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_path_renames_on_success_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        dest = tmp_path / "a" / "x.json"
        write_json_atomic(dest, {"k": 1})
        assert dest.read_text().strip().startswith("{")
        assert _mode(dest) == 0o644
        assert sorted(p.name for p in dest.parent.iterdir()) == ["x.json"]
    finally:
        os.umask(old)


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    dest = tmp_path / "x.bin"
    dest.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    old = os.umask(0o022)
    try:
        dest = tmp_path / "out"
        with atomic_dir(dest) as work:
            (work / "f").write_text("1")
        assert _mode(dest) == 0o755 and (dest / "f").read_text() == "1"
        with pytest.raises(RuntimeError):
            with atomic_dir(dest) as work:
                (work / "g").write_text("2")
                raise RuntimeError("stage failed")
        assert sorted(p.name for p in dest.iterdir()) == ["f"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        with atomic_dir(dest) as work:
            (work / "g").write_text("2")
        assert sorted(p.name for p in dest.iterdir()) == ["g"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    finally:
        os.umask(old)


def test_sha256_file(tmp_path):
    p = tmp_path / "w"
    p.write_bytes(b"abc")
    assert sha256_file(p, chunk_bytes=2) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
