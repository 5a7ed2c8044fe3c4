"""Output folders and files: moec replaces only what it provably made, survives a crash around its
renames, and turns a full disk into one named error (issue 11, "data safety")."""

from __future__ import annotations

import errno
import json
import os
import socket

import pytest

from moec.common.artifacts import OUTPUT_MARKER, atomic_dir, atomic_path, check_output_dir, write_json_atomic
from moec.common.errors import MoecError


def _listing(p):
    return sorted(x.name for x in p.iterdir())


@pytest.mark.parametrize("common_name", ["manifest.json", "compile_report.json", "moec-demo-checkpoint.txt"])
def test_a_common_file_name_does_not_make_a_folder_replaceable(tmp_path, common_name):
    user = tmp_path / "results"
    user.mkdir()
    (user / common_name).write_text("{}")
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(MoecError, match="not an earlier output of `moec build`"):
        with atomic_dir(user, command="build"):
            pytest.fail("must not run")
    assert _listing(user) == sorted([common_name, "thesis.tex"])


def test_an_output_of_another_command_is_refused(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, command="compile") as work:
        (work / "x").write_text("1")
    with pytest.raises(MoecError, match="output of `moec compile`, not of `moec build`"):
        check_output_dir(out, command="build")
    with atomic_dir(out, command="compile") as work:  # the same command replaces it
        (work / "y").write_text("2")
    assert _listing(out) == [OUTPUT_MARKER, "y"]
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "compile"


def test_a_symlinked_output_folder_is_refused(tmp_path):
    real = tmp_path / "real"
    with atomic_dir(real, command="build") as work:
        (work / "e").write_text("1")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(MoecError, match="symbolic link"):
        with atomic_dir(link, command="build"):
            pytest.fail("must not run")
    file_link = tmp_path / "f.json"
    file_link.symlink_to(real / "e")
    with pytest.raises(MoecError, match="symbolic link"):
        write_json_atomic(file_link, {})
    assert link.is_symlink() and file_link.is_symlink() and (real / "e").read_text() == "1"


def test_an_old_sibling_that_is_not_moecs_is_refused_not_deleted(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, command="build") as work:
        (work / "e").write_text("1")
    old = tmp_path / ".out.old"
    old.mkdir()
    (old / "mine.txt").write_text("keep")
    with pytest.raises(MoecError, match=r"\.out\.old exists and is not an earlier"):
        with atomic_dir(out, command="build"):
            pytest.fail("must not run")
    assert (old / "mine.txt").read_text() == "keep" and (out / "e").read_text() == "1"


def test_a_crash_between_the_renames_is_recovered_by_the_next_run(tmp_path, caplog):
    out = tmp_path / "out"
    with atomic_dir(out, command="build") as work:
        (work / "e").write_text("previous")
    os.replace(out, tmp_path / ".out.old")  # killed after the first rename
    with caplog.at_level("WARNING", logger="moec"):
        check_output_dir(out, command="build")  # the check alone changes nothing
        assert not out.exists()
        with pytest.raises(RuntimeError):
            with atomic_dir(out, command="build"):
                raise RuntimeError("this run fails too")
    # The previous output is back where it was, found by the failed run, and reported.
    assert (out / "e").read_text() == "previous" and not (tmp_path / ".out.old").exists()
    assert any("restored the previous output" in r.getMessage() for r in caplog.records)
    # Killed after the second rename: the superseded .old is removed by the next run.
    with atomic_dir(tmp_path / "scratch", command="build") as work:
        (work / "e").write_text("superseded")
    os.replace(tmp_path / "scratch", tmp_path / ".out.old")
    with atomic_dir(out, command="build") as work:
        (work / "e").write_text("new")
    assert (out / "e").read_text() == "new" and _listing(tmp_path) == ["out"]


def test_a_failed_second_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out, command="build") as work:
        (work / "e").write_text("previous")
    real_replace = os.replace

    def flaky(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        with atomic_dir(out, command="build") as work:
            (work / "e").write_text("new")
    monkeypatch.undo()
    assert (out / "e").read_text() == "previous" and _listing(tmp_path) == ["out"]


def test_leftover_tmp_folders_of_dead_runs_are_cleaned_others_reported(tmp_path, caplog):
    out = tmp_path / "out"
    dead = tmp_path / ".out.abc123.tmp"
    dead.mkdir()
    (dead / "half.plan").write_bytes(b"x")
    # pid 2**22 + 1 is above Linux's pid_max default ceiling: no such process.
    (dead / OUTPUT_MARKER).write_text(json.dumps({"written_by": "moec", "command": "build", "pid": 2**22 + 1,
                                                  "host": socket.gethostname()}))
    alive = tmp_path / ".out.def456.tmp"
    alive.mkdir()
    (alive / OUTPUT_MARKER).write_text(json.dumps({"written_by": "moec", "command": "build", "pid": os.getpid(),
                                                   "host": socket.gethostname()}))
    foreign = tmp_path / ".out.zzz.tmp"
    foreign.mkdir()
    (foreign / "x").write_text("not moec's")
    with caplog.at_level("WARNING", logger="moec"):
        with atomic_dir(out, command="build") as work:
            (work / "e").write_text("1")
    assert not dead.exists() and alive.is_dir() and (foreign / "x").is_file()
    assert any(".out.zzz.tmp" in r.getMessage() for r in caplog.records)


def test_a_failed_command_leaves_no_empty_folder_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "a" / "b" / "out", command="build"):
            raise RuntimeError("failed")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "c" / "d" / "x.json"):
            raise RuntimeError("failed")
    assert _listing(tmp_path) == []


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_a_named_error_and_leaves_nothing(tmp_path, monkeypatch):
    dest = tmp_path / "sub" / "r.json"
    monkeypatch.setattr("pathlib.Path.write_text", _full_disk)
    with pytest.raises(MoecError, match=r"cannot write .*r\.json: No space left on device"):
        write_json_atomic(dest, {"k": 1})
    with pytest.raises(MoecError, match="No space left on device"):
        with atomic_dir(tmp_path / "out", command="build"):
            pass  # the marker itself cannot be written
    monkeypatch.undo()
    with pytest.raises(MoecError, match=r"cannot write .*out: No space left on device"):
        with atomic_dir(tmp_path / "out", command="build") as work:
            _full_disk(work / "engine.plan")
    assert _listing(tmp_path) == []
