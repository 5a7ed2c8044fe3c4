"""Atomic artifact writes: all or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from moec.common.artifacts import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_path,
    check_output_dir,
    sha256_file,
    write_json_atomic,
)
from moec.common.errors import MoecError


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
        with atomic_dir(dest, command="build") as work:
            (work / "manifest.json").write_text("1")
        assert _mode(dest) == 0o755 and (dest / "manifest.json").read_text() == "1"
        with pytest.raises(RuntimeError):
            with atomic_dir(dest, command="build") as work:
                (work / "g").write_text("2")
                raise RuntimeError("stage failed")
        assert sorted(p.name for p in dest.iterdir()) == [OUTPUT_MARKER, "manifest.json"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        with atomic_dir(dest, command="build") as work:
            (work / "g").write_text("2")
        assert sorted(p.name for p in dest.iterdir()) == [OUTPUT_MARKER, "g"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    finally:
        os.umask(old)


def test_atomic_dir_never_replaces_what_is_not_an_earlier_output(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(MoecError, match="choose a new or empty folder"):
        with atomic_dir(mine, command="build"):
            pytest.fail("the body must not run")
    a_file = tmp_path / "f"
    a_file.write_text("keep")
    with pytest.raises(MoecError, match="is a file"):
        with atomic_dir(a_file, command="build"):
            pass
    # An output folder that holds (or is) an input would destroy it.
    with pytest.raises(MoecError, match="holds the input"):
        check_output_dir(tmp_path, command="build", inputs=[mine / "notes.txt"])
    with pytest.raises(MoecError, match="holds the input"):
        check_output_dir(mine, command="build", inputs=[mine])
    # An empty folder is fine.
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", command="build") as work:
        (work / "x").write_text("1")
    assert (mine / "notes.txt").read_text() == "keep" and a_file.read_text() == "keep"


def test_unwritable_location_is_a_moec_error(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder would have to be")
    with pytest.raises(MoecError, match="cannot write"):
        with atomic_path(blocker / "x.json"):
            pass
    with pytest.raises(MoecError, match="cannot write"):
        with atomic_dir(blocker / "out", command="build"):
            pass
    with pytest.raises(MoecError, match="is a folder"):
        write_json_atomic(tmp_path, {})


def test_sha256_file(tmp_path):
    p = tmp_path / "w"
    p.write_bytes(b"abc")
    assert sha256_file(p, chunk_bytes=2) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
